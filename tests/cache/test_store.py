"""The store with real processes: readers never see a partial entry while a writer publishes, two
users asking one shared store for the same entry at once compute it once, keys resolve by prefix,
locks exclude, gc removes only what nobody holds."""
import json
import os
import subprocess
import sys
import time

import pytest

from cache.gc import collect_garbage
from cache.store import LockBusy, Store, StoreError
from extract.backbones import BackboneSpec
from extract.datasets import build_dataset
from extract.manifest import build_manifest
from tests.fixtures.images import mini_cub
from tests.fixtures.store import REPO, extract_tiny, publish_tiny


def test_readers_never_see_a_partial_entry_while_a_writer_publishes(tmp_path):
    source = extract_tiny(tmp_path / "src")
    root, count = tmp_path / "store", 6
    done = tmp_path / "published"
    module = [sys.executable, "-m", "tests.fixtures.store_workers"]
    readers = [subprocess.Popen([*module, "read", root, tmp_path / f"ready{i}", done], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.time() + 60
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
            assert time.time() < deadline and all(r.poll() is None for r in readers), "readers did not start"
            time.sleep(0.05)
        writer = subprocess.run([*module, "publish", root, source, str(count), done], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert writer.returncode == 0, writer.stderr
        results = [json.loads(r.communicate(timeout=60)[0]) for r in readers]
    finally:
        for r in readers:
            if r.poll() is None:
                r.kill()
                r.wait()
    for result in results:
        assert result["failures"] == [] and result["final_keys"] == count
        # they read while entries were appearing, not only before or after
        assert any(0 < n < count for n in result["entry_counts_seen"]), result
        assert result["checks"] > count
    assert sorted(os.listdir(root / "staging")) == []


def test_two_users_asking_one_shared_store_at_once_compute_the_entry_once(tmp_path, shared_data):
    data_root = mini_cub(tmp_path / "data", shared_data, per_class=4)
    shared = tmp_path / "shared-store"
    spec = BackboneSpec("efficientnet_lite0", 64, "imagenet")
    dataset = build_dataset("CUB100", data_root=data_root, xlsa17_root=shared_data / "xlsa17",
                            w2v_root=shared_data / "attribute_w2v")
    key = build_manifest(dataset, spec)["content_key"]
    args = [sys.executable, "cli.py", "extract", "--dataset", "CUB100", "--data-root", data_root,
            "--xlsa17-root", shared_data / "xlsa17", "--w2v-root", shared_data / "attribute_w2v",
            "--backbone", spec.name, "--image-size", "64", "--batch-size", "4", "--workers", "0",
            "--device", "cpu", "--no-progress"]
    users = {"alice": ({**os.environ, "MSDN_CACHE_DIR": str(shared)}, []),    # her store setting
             "bob": (dict(os.environ), ["--cache-dir", shared])}               # his command line
    procs, errs = {}, {name: tmp_path / f"{name}.err" for name in users}
    with Store(shared).lock(key):  # both ask while the entry is being "computed": hold it until both wait
        for name, (env, extra) in users.items():
            procs[name] = subprocess.Popen([*map(str, args), *map(str, extra)], cwd=REPO, env=env,
                                           stdout=subprocess.PIPE, stderr=open(errs[name], "w"), text=True)
        deadline = time.time() + 90
        while not all("waiting for" in errs[n].read_text() for n in users):
            assert time.time() < deadline and all(p.poll() is None for p in procs.values()), \
                {n: errs[n].read_text() for n in users}
            time.sleep(0.1)
    outputs = {name: p.communicate(timeout=120)[0] for name, p in procs.items()}
    logs = {name: errs[name].read_text() for name in users}
    assert all(p.returncode == 0 for p in procs.values()), logs
    assert all(out.strip() == key for out in outputs.values())
    computed = [name for name in users if "extracting 16 of 16" in logs[name]]
    assert len(computed) == 1, logs                                   # computed once...
    other = next(name for name in users if name not in computed)
    assert "published by another process meanwhile: reusing it" in logs[other]   # ...and reused
    store = Store(shared)
    assert store.keys() == [key] and list((shared / "staging").iterdir()) == []


def test_keys_resolve_by_unique_prefix(tmp_path):
    store, key = publish_tiny(tmp_path / "store", tmp_path / "a")
    assert store.resolve(key[:6]) == key and store.resolve(key.upper()) == key
    for twin in ("abcd" + "0" * 60, "abcd" + "1" * 60):  # two entries whose keys share a prefix
        stage = store.staging("test", twin)
        (stage / "features.h5").write_bytes(store.features_path(key).read_bytes())
        store.publish(stage, twin, store.record(key)["manifest"])
    assert store.resolve("abcd0") == "abcd" + "0" * 60
    with pytest.raises(StoreError, match="ambiguous"):
        store.resolve("abcd")
    with pytest.raises(StoreError, match="at least 4"):
        store.resolve("ab")
    with pytest.raises(StoreError, match="no entry"):
        store.resolve("z" * 10)


def test_a_held_lock_excludes_and_gc_leaves_held_keys_alone(tmp_path):
    store, key = publish_tiny(tmp_path / "store", tmp_path / "a")
    stale = store.staging("extract", "f" * 64)
    (stale / "features.h5.partial").write_bytes(b"x")
    held = store.staging("copy", "e" * 64)
    old = time.time() - 3 * 86400
    for path in (stale, stale / "features.h5.partial", held):
        os.utime(path, (old, old))
    os.utime(store.root / "entries" / key / "entry.json", (old, old))
    with store.lock("e" * 64):
        child = subprocess.run([sys.executable, "-c", "from cache.store import Store, LockBusy\n"
                                f"try:\n    Store({str(store.root)!r}).lock({'e' * 64!r}, timeout=0.3).__enter__()\n"
                                "except LockBusy as e:\n    print('busy', e)"], cwd=REPO, capture_output=True, text=True)
        assert child.stdout.startswith("busy") and f"pid {os.getpid()}" in child.stdout
        with pytest.raises(LockBusy):                          # flock also excludes a second open here
            with store.lock("e" * 64, timeout=0.2):
                pass
        assert collect_garbage(store, dry_run=True, older_than_days=1, log=lambda m: None) == [
            f"would remove stale staging extract-{'f' * 64}", f"would remove entry {key} (unused 3 days)"]
        removed = collect_garbage(store, log=lambda m: None)                  # entries kept by default
        assert removed == [f"removed stale staging extract-{'f' * 64}"] and held.exists() and store.has(key)
    removed = collect_garbage(store, max_bytes=0, stale_hours=1e9, log=lambda m: None)
    assert len(removed) == 1 and removed[0].startswith(f"removed entry {key}") and store.keys() == []
