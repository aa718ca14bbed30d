"""What the CLI's one handler (cli.py `_Main`) needs to turn a failure into one line: the user-error
base class, and how to read a filesystem fault (disk full, read-only or missing folder) off an
OSError or an h5py write error, with what a rerun of each command does afterwards."""
from __future__ import annotations

import os
import re

from cache.errors import UserError

__all__ = ["AFTER_FAULT", "UserError", "filesystem_fault"]

# What a rerun does after a filesystem fault, per command.
AFTER_FAULT = {
    "extract": "rerun with --resume once fixed: it keeps every row already written and extracts only the rest",
    "train": "no result was recorded (no summary.json); rerun once fixed (--overwrite reuses the run folder)",
    "evaluate": "no result was recorded; rerun once fixed",
    "baseline": "no result was recorded (no summary.json); rerun once fixed (--overwrite reuses the run folder)",
    "demo": "rerun `msdn demo` once fixed: it reuses the rendered images and continues the feature cache",
    "ablate": "finished cells are kept; rerun the same command once fixed to go on",
    "cache": "rerun once fixed (nothing half-copied is published; a push or pull resumes its partial copy)",
}


def filesystem_fault(err: BaseException) -> tuple[str, bool] | None:
    """("<file>: <reason>", whether HDF5 failed writing) for an OSError or an h5py I/O failure,
    also when that failure is the context of the error that surfaced (h5py's close failing after
    a failed write); None for anything else."""
    seen, chain = err, []
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        text = " ".join(str(e).split())  # h5py's messages hold a newline
        code = re.search(r"errno = (\d+)", text)
        if code:  # h5py: "... (file write failed: ..., filename = 'x.h5', ..., errno = 28, ...)"
            name = re.search(r"name = '([^']*)'", text)
            return (f"{name.group(1) if name else text}: {os.strerror(int(code.group(1)))}",
                    any("write failed" in str(x) for x in chain))
        if isinstance(e, OSError):
            return (f"{e.filename}: {os.strerror(e.errno)}" if e.errno and e.filename else text), False
    return None
