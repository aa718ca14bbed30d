"""`msdn cache ...`: the jobs behind the store commands (the CLI only parses options)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cache.reader import CacheError
from cache.store import FEATURES_FILE, RECORD_FILE, Store, StoreError, human_bytes, store_root
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
        rec = store.record(key)
        manifest = rec["manifest"]
        name = manifest.get("dataset", {}).get("name", "?")
        if dataset is not None and name.lower() != dataset.lower():
            continue
        backbone = manifest.get("backbone", {})
        rows.append({"key": key if full_keys else key[:12], "dataset": name,
                     "backbone": f"{backbone.get('name', '?')}@{backbone.get('image_size', '?')}",
                     "size": human_bytes(sum(f["bytes"] for f in rec["files"].values())),
                     "shape": " x ".join(str(x) for x in [rec["rows"], *rec["feature_shape"]]),
                     "dtype": rec["dtype"], "created": manifest.get("created", rec.get("published", "")),
                     "complete": bool(rec["complete"])})
    table = pd.DataFrame(rows, columns=LS_COLUMNS)
    return table.sort_values("created", ascending=False, ignore_index=True)


def recipe_dataset(recipe: str) -> str:
    """The dataset a recipe trains on: its `recipe` name (CUB, SUN, AWA2, APY, FLO, CUB100, demo)."""
    from pipeline.config import load_recipe

    return load_recipe(recipe).recipe


def resolve_cache(value: str | Path, cache_dir: str | None = None) -> Path:
    """A feature cache named by path, by entry folder, or by store key (or unique key prefix)."""
    path = Path(value)
    if path.is_file():
        return path
    if path.is_dir() and (path / FEATURES_FILE).is_file():
        return path / FEATURES_FILE
    root = store_root(cache_dir)
    if root is None or "/" in str(value) or str(value).endswith(".h5"):
        raise CacheError(f"{value}: feature cache not found" + ("" if root else
                         " (to name a store key, pass --cache-dir or set MSDN_CACHE_DIR)"))
    store = Store(root)
    key = store.resolve(str(value))
    store.touch_used(key)
    return store.features_path(key)


def verify(target: str, cache_dir: str | None = None) -> VerifyReport:
    """Verify a cache file (by path) or a store entry (by key: its files against the record too)."""
    path = Path(target)
    if path.is_file():
        return verify_cache(path)
    if path.is_dir() and (path / RECORD_FILE).is_file():
        return verify_cache(path / FEATURES_FILE)
    return verify_cache(resolve_cache(target, cache_dir))


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
           cache_dir: str | None = None) -> Path:
    from cache.shards import export_cache

    source = resolve_cache(target, cache_dir)
    if Path(dest).exists():
        raise CacheError(f"{dest}: exists; choose another file or delete it")
    return export_cache(source, dest, dtype=dtype, compression=compression)


def parse_size(text: str) -> int:
    """'500M', '20G', '1.5T' or bytes -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        raise StoreError(f"{text!r}: not a size (e.g. 500M, 20G)") from None
