"""Stage 2 and the command glue: the training core (config, tasks, features, samplers, engine, train,
evaluate, metrics, checkpoint, run log) here, one module per other command in pipeline/commands/."""


def version_line() -> str:
    """`msdn --version`: this package's version (from its install, or "not installed" in a bare
    checkout), python's and torch's."""
    import platform
    from importlib import metadata

    import torch

    try:
        version = metadata.version("msdn-zsl")
    except metadata.PackageNotFoundError:
        version = "(not installed)"
    return f"msdn-zsl {version} (python {platform.python_version()}, torch {torch.__version__})"
