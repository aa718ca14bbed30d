"""The feature cache a trained run belongs to, found the same way by `msdn predict`, `evaluate` and
`visualize`: the --cache given, else the path the run's config.json records (absolute since issue 20;
older runs recorded the path as given, relative to where training ran), else the store entry of the
checkpoint's content key (--cache-dir or $MSDN_CACHE_DIR), so that a run folder moved to another
directory or machine still finds its cache."""
from __future__ import annotations

import json
from pathlib import Path

from cache.errors import UserError
from cache.store import resolve_cache, store_root


class RunCacheError(UserError, ValueError):
    """The cache of a run cannot be found; the message says where it was looked for."""


def recorded_cache(run_dir: Path) -> str | None:
    """The cache path <run_dir>/config.json records, or None."""
    try:
        return json.loads((run_dir / "config.json").read_text())["run"]["cache"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_cache(checkpoint: Path, ckpt: dict, cache: str | Path | None, cache_dir: str | None) -> Path:
    """`cache` (a path or store key), else the cache recorded in the run's config.json next to the
    checkpoint, else the store entry of the checkpoint's content key."""
    if cache is not None:
        return resolve_cache(cache, cache_dir)
    checkpoint = Path(checkpoint)
    config_file = checkpoint.parent / "config.json"
    recorded = recorded_cache(checkpoint.parent)
    if recorded is not None and Path(recorded).is_file():
        return Path(recorded)
    key = ckpt["cache"]["content_key"]
    if store_root(cache_dir) is not None and not key.startswith("data-sha256:"):
        try:
            return resolve_cache(key, cache_dir)
        except UserError:
            pass
    where = (f"its run records {recorded}, which is not there" if recorded is not None else
             "no run config.json next to it names one" if not config_file.is_file() else
             f"{config_file} names no cache")
    store = "" if store_root(cache_dir) is not None or key.startswith("data-sha256:") else \
        ", or name the store that holds it (--cache-dir or $MSDN_CACHE_DIR): it is found by key"
    raise RunCacheError(f"{checkpoint}: cannot find the feature cache it was trained on ({where}; content key "
                        f"{key[:16]}...); pass --cache PATH or a store KEY (with --cache-dir){store}")
