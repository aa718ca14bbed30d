"""`msdn cache gc`: remove what nobody holds from a store.

Always: trash left by an interrupted delete; staging folders whose key lock nobody holds and that
nobody touched for `stale_hours` (an interrupted extraction or copy resumes from its staging folder,
so recent ones are kept); lock files of keys with nothing staged. On request: entries not used for
`older_than_days` (by `used/<key>`, touched whenever an entry is resolved), then the least recently
used entries until the store fits in `max_bytes`. A key whose lock is held is never touched.
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from cache.store import LockBusy, Store, StoreError


def collect_garbage(store: Store, *, stale_hours: float = 24.0, older_than_days: float | None = None,
                    max_bytes: int | None = None, dry_run: bool = False, log=print) -> list[str]:
    """Remove (or with dry_run only list) garbage; returns one line per thing removed. Negative, NaN
    or infinite ages and sizes are refused before anything is touched (a negative age would match
    every entry; NaN none)."""
    for name, value in (("stale_hours", stale_hours), ("older_than_days", older_than_days),
                        ("max_bytes", max_bytes)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise StoreError(f"gc: {name} must be a finite number >= 0, got {value}")
    done: list[str] = []
    now = time.time()

    def act(what: str, fn) -> None:
        done.append(("would remove " if dry_run else "removed ") + what)
        log(done[-1])
        if not dry_run:
            fn()

    for path in _children(store.root / "trash"):
        act(f"trash {path.name}", lambda p=path: shutil.rmtree(p, ignore_errors=True))
    for path in _children(store.root / "staging"):
        key = path.name.split("-", 1)[-1]
        if now - _newest_mtime(path) < stale_hours * 3600:
            continue
        _if_unlocked(store, key, lambda p=path: act(f"stale staging {p.name}", lambda: shutil.rmtree(p, ignore_errors=True)))
    staged = {p.name.split("-", 1)[-1] for p in _children(store.root / "staging")}
    for lock in _children(store.root / "locks"):
        key = lock.name.removesuffix(".lock")
        if key not in staged and not dry_run:
            _if_unlocked(store, key, lambda p=lock: p.unlink(missing_ok=True))  # safe: lock() re-checks the inode

    keys = sorted(store.keys(), key=store.last_used)  # least recently used first
    if older_than_days is not None:
        for key in [k for k in keys if now - store.last_used(k) > older_than_days * 86400]:
            _if_unlocked(store, key, lambda k=key: act(f"entry {k} (unused {(now - store.last_used(k)) / 86400:.0f} days)",
                                                        lambda: store.remove(k)))
        keys = [k for k in keys if dry_run or store.has(k)]
    if max_bytes is not None:
        sizes = {k: store.entry_bytes(k) for k in keys if store.has(k)}
        total = sum(sizes.values())
        for key in list(sizes):
            if total <= max_bytes:
                break
            removed = []
            _if_unlocked(store, key, lambda k=key: (act(f"entry {k} ({sizes[k] / 1e9:.2f} GB, least recently used)",
                                                         lambda: store.remove(k)), removed.append(k)))
            total -= sizes[key] if removed else 0
    return done


def _if_unlocked(store: Store, key: str, fn) -> None:
    """Run fn while holding the key's lock; skip the key when someone else holds it."""
    try:
        lock = store.lock(key, timeout=0)
        lock.__enter__()
    except LockBusy:
        return
    try:
        fn()
    finally:
        lock.__exit__(None, None, None)


def _children(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _newest_mtime(folder: Path) -> float:
    return max([folder.stat().st_mtime] + [p.stat().st_mtime for p in folder.rglob("*")])
