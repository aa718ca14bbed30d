"""Helpers shared by the two lock files of the project: the store's entry locks (cache/store.py)
and a plain `--out` extraction's lock (cache/writer.py)."""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; the store refuses in one line, a plain extraction warns
    fcntl = None


def lock_exclusive(fd: int) -> None:
    """flock(LOCK_EX | LOCK_NB) on `fd`: BlockingIOError when another process holds it, an OSError
    with ENOSYS where this platform has no flock (as a filesystem without locks answers)."""
    if fcntl is None:
        raise OSError(errno.ENOSYS, "file locking (fcntl.flock) is not available on this platform")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


BUSY = "held by another process"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # a filesystem (or platform) without flock


def try_lock(fd: int) -> str | None:
    """lock_exclusive, answered: None when `fd` holds the lock now, BUSY when another process holds
    it, or why there are no locks here (the filesystem's reason); any other OSError is raised. Unless
    it holds the lock, `fd` is closed."""
    try:
        lock_exclusive(fd)
        return None
    except BlockingIOError:
        os.close(fd)
        return BUSY
    except OSError as err:
        os.close(fd)
        if err.errno not in _NO_LOCKS:
            raise
        return err.strerror or "no file locks"


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
