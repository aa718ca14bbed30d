"""Stage 2 and the command glue: the training core (config, tasks, features, samplers, engine, train,
evaluate, metrics, checkpoint, run log) here, one module per other command in pipeline/commands/."""
from pathlib import Path

RECIPE_DIR = Path(__file__).parent / "recipes"


def available_recipes() -> list[str]:
    """The recipe names pipeline/recipes/ holds (light: `msdn train --help` lists them)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))



def version_line() -> str:
    """`msdn --version`: the running code's version, python's and torch's, and the git commit when
    run from a checkout (pipeline/provenance.py, as every run's config.json records them)."""
    from pipeline.provenance import environment

    env = environment()
    commit = f", commit {env['git']['commit'][:12]}{' (modified)' if env['git']['dirty'] else ''}" if env["git"] else ""
    return f"msdn-zsl {env['msdn_zsl']} (python {env['python']}, torch {env['torch']}{commit})"
