"""What produced a run: the versions and the code, recorded in every run folder's config.json.

    "environment": {"python": "3.11.9", "torch": "2.5.1+cpu", "numpy": "2.1.3", "msdn_zsl": "0.1.0",
                    "platform": "Linux-6.8.0-x86_64-with-glibc2.39",
                    "git": {"commit": "e01deb0...", "dirty": false}}

`git` is the commit of the checkout the running code comes from (the folder above this package,
where cli.py lives) and whether its tracked files differ from that commit (untracked files do not
count). It is null when that folder is not the top of a git checkout (an installed wheel, a copied
tree; a checkout further up, e.g. a project that vendors this package, is not ours) or when git is
missing, slow or refuses: recording where a run came from never stops the run.
"""
from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

from pipeline.config import tomllib  # tomli on Python 3.10

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
GIT_TIMEOUT_S = 5.0


def environment(root: Path = PACKAGE_ROOT) -> dict:
    """Versions of python, torch, numpy and msdn-zsl, the platform, and the git state of `root`."""
    import numpy
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "msdn_zsl": package_version(root), "platform": platform.platform(), "git": git_state(root)}


def package_version(root: Path = PACKAGE_ROOT) -> str | None:
    """The version of the code that runs: its own pyproject.toml when run from a source tree (an
    editable install of another checkout would say that one's), else the installed metadata."""
    try:
        return str(tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"])
    except (OSError, KeyError, TypeError, ValueError):
        pass
    try:
        return metadata.version("msdn-zsl")
    except metadata.PackageNotFoundError:
        return None


def git_state(root: Path = PACKAGE_ROOT) -> dict | None:
    """{"commit", "dirty"} when `root` is the top folder of a git checkout, else None (also when
    git is not installed, times out or fails)."""
    root = Path(root).resolve()
    top = _git(root, "rev-parse", "--show-toplevel", "HEAD")
    if top is None:
        return None
    lines = top.splitlines()
    if len(lines) != 2 or Path(lines[0]).resolve() != root:
        return None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": lines[1], "dirty": None if status is None else bool(status.strip())}


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):  # no git on PATH, timeout
        return None
    return done.stdout if done.returncode == 0 else None
