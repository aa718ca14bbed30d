"""`msdn` command line. Thin by design: each command parses options and calls into `pipeline/`."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """MSDN++ zero-shot learning: extract backbone features once, then train and evaluate in minutes."""


if __name__ == "__main__":
    main()
