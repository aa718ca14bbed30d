"""Processes for the store concurrency tests (run with `python -m tests.cache.store_workers ...`).

    publish STORE SOURCE N DONE_FILE   publish N entries, each a copy of the cache SOURCE written into
                                       its staging folder slowly (so half-written states last), then
                                       create DONE_FILE
    read STORE READY DONE_FILE         create READY, then until DONE_FILE exists (and one pass more): list the entries and
                                       check each one whole (files, sizes, rows, checksums); print a
                                       JSON summary
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from cache.store import FEATURES_FILE, Store


def publish(root: str, source: str, count: int, done_file: str) -> None:
    import h5py

    store = Store(root)
    with h5py.File(source, "r") as f:
        manifest = json.loads(f.attrs["manifest"])
    data = Path(source).read_bytes()
    for i in range(count):
        key = f"{i:064x}"
        with store.lock(key):
            stage = store.staging("test", key)
            with open(stage / FEATURES_FILE, "wb") as out:
                for start in range(0, len(data), 16384):
                    out.write(data[start:start + 16384])
                    out.flush()
                    time.sleep(0.01)
            store.publish(stage, key, manifest)
    Path(done_file).touch()


def read(root: str, ready_file: str, done_file: str) -> None:
    from cache.verify import verify_cache

    store, passes, checks, failures, counts = Store(root), 0, 0, [], set()
    Path(ready_file).touch()
    while True:
        last = Path(done_file).exists()
        keys = store.keys()
        passes += 1
        counts.add(len(keys))
        for key in keys:
            try:
                report = verify_cache(store.features_path(key), store.record(key))
                if report.verdict != "ok":
                    failures.append(f"{key[-4:]}: " + "; ".join(report.lines()))
            except Exception as err:  # noqa: BLE001 - every failure is reported, none hidden
                failures.append(f"{key[-4:]}: {type(err).__name__}: {err}")
            checks += 1
        if last:
            break
    print(json.dumps({"passes": passes, "checks": checks, "failures": failures[:5],
                      "entry_counts_seen": sorted(counts), "final_keys": len(store.keys())}))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "publish":
        publish(args[0], args[1], int(args[2]), args[3])
    elif command == "read":
        read(*args)
    else:
        sys.exit(f"unknown command {command!r}")
