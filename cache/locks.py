"""Helpers shared by the two lock files of the project: the store's entry locks (cache/store.py)
and a plain `--out` extraction's lock (cache/writer.py)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def same_file(fd: int, path: Path) -> bool:
    """Whether the open descriptor is still the file at `path` (its holder may have removed it
    between our open and our lock)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def lock_holder(path: Path) -> str:
    """Who holds a lock file, as its holder wrote it (pid and host), or "another process"."""
    with contextlib.suppress(OSError):
        text = path.read_text().strip()
        if text:
            return text
    return "another process"
