"""One module per `msdn` command other than train and evaluate (the stage-2 core in pipeline/):
extract, cache, ablate, baseline, demo, report, visualize. cli.py parses options and calls these."""
