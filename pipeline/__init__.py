"""Orchestration: jobs that the CLI commands call (extract, train, evaluate, demo)."""
