"""`msdn cache ...`: the jobs behind the store commands (the CLI only parses options)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cache.reader import CacheError
from cache.record import RecordError
from cache.store import (  # noqa: F401 (cli)
    FEATURES_FILE,
    RECORD_FILE,
    Store,
    StoreError,
    human_bytes,
    parse_size,
    resolve_cache,
    store_root,
)
from cache.transfer import copy_entry, open_store
from cache.verify import VerifyReport, verify_cache

LS_COLUMNS = ["key", "dataset", "backbone", "size", "shape", "dtype", "created", "complete"]


def open_local_store(cache_dir: str | None) -> Store:
    root = store_root(cache_dir)
    if root is None:
        raise StoreError("no cache store: pass --cache-dir DIR or set MSDN_CACHE_DIR")
    return Store(root)


def list_entries(store: Store, match: str | None = None, full_keys: bool = False) -> pd.DataFrame:
    """One row per entry (newest first); `match` keeps the entries a recipe can train on."""
    dataset = recipe_dataset(match) if match else None
    rows = []
    for key in store.keys():
        try:
            rec = store.record(key)
        except RecordError:  # one row; `msdn cache verify KEY` says what is wrong with it
            if dataset is None:
                rows.append({**{c: "?" for c in LS_COLUMNS}, "key": key if full_keys else key[:12],
                             "dataset": "damaged", "created": "", "complete": "damaged"})
            continue
        manifest = rec["manifest"]
        name = str(_get(manifest, "dataset", "name"))
        if dataset is not None and name.lower() != dataset.lower():
            continue
        rows.append({"key": key if full_keys else key[:12], "dataset": name,
                     "backbone": f"{_get(manifest, 'backbone', 'name')}@{_get(manifest, 'backbone', 'image_size')}",
                     "size": human_bytes(sum(f["bytes"] for f in rec["files"].values())),
                     "shape": " x ".join(str(x) for x in [rec["rows"], *rec["feature_shape"]]),
                     "dtype": rec["dtype"], "created": str(manifest.get("created", rec.get("published", ""))),
                     "complete": bool(rec["complete"])})
    table = pd.DataFrame(rows, columns=LS_COLUMNS)
    return table.sort_values("created", ascending=False, ignore_index=True)


def _get(manifest: dict, *path: str):
    """manifest[path[0]][path[1]]..., or "?" where a level is missing or not an object (the manifest
    is free-form: cache/record.py checks only the record's own fields)."""
    value = manifest
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return "?"
        value = value[part]
    return value


def recipe_dataset(recipe: str) -> str:
    """The dataset a recipe trains on: its `recipe` name (CUB, SUN, AWA2, APY, FLO, CUB100, demo)."""
    from pipeline.config import load_recipe

    return load_recipe(recipe).recipe


def verify(target: str, cache_dir: str | None = None) -> VerifyReport:
    """Verify a cache file (by path) or a store entry (by key: its files against the record too)."""
    path = Path(target)
    if path.is_file():
        return verify_cache(path)
    if path.is_dir() and (path / RECORD_FILE).is_file():
        return verify_cache(path / FEATURES_FILE)
    return verify_cache(resolve_cache(target, cache_dir, check_record=False))


def push(key: str, dest: str, cache_dir: str | None = None, log=print) -> str:
    record = copy_entry(key, open_local_store(cache_dir), _other_store(dest), log=log)
    return record["key"]


def pull(key: str, source: str, cache_dir: str | None = None, log=print) -> str:
    record = copy_entry(key, _other_store(source), open_local_store(cache_dir), log=log)
    return record["key"]


def _other_store(where: str):
    """The store on the other side of a copy; a URL fsspec cannot open is a StoreError."""
    try:
        return open_store(where)
    except CacheError:
        raise
    except ImportError as err:  # fsspec knows the protocol, but its package is missing (s3fs, gcsfs ...)
        raise StoreError(f"{where}: {err}; or mount the location and give its path") from None
    except ValueError as err:  # fsspec: "Protocol not known: foo"
        raise StoreError(f"{where}: {err}; give a directory or a URL fsspec supports (s3://, gs://, "
                         "sftp://, memory:// ...)") from None


def export(target: str, dest: str, *, dtype: str | None = None, compression: str | None = None,
           cache_dir: str | None = None, log=None) -> Path:
    from cache.shards import export_cache

    source = resolve_cache(target, cache_dir)
    if Path(dest).exists():
        raise CacheError(f"{dest}: exists; choose another file or delete it")
    return export_cache(source, dest, dtype=dtype, compression=compression, log=log)


def remove(key: str, cache_dir: str | None = None) -> str:
    """`msdn cache rm KEY`: the entry's full key, once removed (readers that have it open keep reading)."""
    store = open_local_store(cache_dir)
    full = store.resolve(key)
    with store.lock(full):
        store.remove(full)
    return full


def gc(cache_dir: str | None, **options) -> list[str]:
    """`msdn cache gc`: cache/gc.py's collect_garbage on the local store; one line per thing removed."""
    from cache.gc import collect_garbage

    return collect_garbage(open_local_store(cache_dir), **options)
