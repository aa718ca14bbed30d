"""push/pull between stores with real processes: a push killed mid-copy resumes from its partial file
and ends verified; a copy damaged in flight is caught before it is published; fsspec URLs work."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cache.reader import FeatureCache
from cache.store import Store
from cache.transfer import RemoteStore, TransferError, copy_entry
from cache.verify import verify_cache
from tests.cache.store_data import REPO, flip_byte, publish_tiny, run_cli


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    base = tmp_path_factory.mktemp("transfer")
    return publish_tiny(base / "store", base / "work", n=16)


def same_rows(a, b) -> bool:
    with FeatureCache(a) as x, FeatureCache(b) as y:
        return torch.equal(x.features(), y.features())


def test_an_interrupted_push_resumes_and_ends_verified(source, tmp_path):
    store, key = source
    dest = tmp_path / "team-store"
    part = dest / "staging" / f"copy-{key}" / "features.h5.part"
    total = store.record(key)["files"]["features.h5"]["bytes"]
    slow = {**os.environ, "MSDN_TRANSFER_BLOCK": "4096", "MSDN_TRANSFER_THROTTLE_S": "0.03"}
    proc = subprocess.Popen([sys.executable, "cli.py", "cache", "push", key[:10], str(dest), "--cache-dir",
                             str(store.root)], cwd=REPO, env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while not (part.exists() and part.stat().st_size > total // 4):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    copied = part.stat().st_size
    assert total // 4 < copied < total and not Store(dest).has(key)   # nothing published half-way

    resumed = run_cli("cache", "push", key[:10], dest, "--cache-dir", store.root)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming features.h5 at {copied} of {total} bytes" in resumed.stderr
    assert "copied and verified" in resumed.stderr and resumed.stdout.strip() == key
    assert Store(dest).keys() == [key] and not part.exists()
    assert verify_cache(Store(dest).features_path(key)).verdict == "ok"
    assert same_rows(store.features_path(key), Store(dest).features_path(key))
    again = run_cli("cache", "push", key[:10], dest, "--cache-dir", store.root)
    assert again.returncode == 0 and "already there" in again.stderr


def test_a_copy_damaged_in_flight_is_not_published(source, tmp_path, monkeypatch):
    store, key = source
    dest = Store(tmp_path / "dest")
    part = dest.root / "staging" / f"copy-{key}" / "features.h5.part"
    monkeypatch.setenv("MSDN_TRANSFER_BLOCK", "4096")
    seen = []
    # Start a copy of the first bytes by hand, damage them, then let copy_entry resume from there.
    part.parent.mkdir(parents=True)
    with open(store.features_path(key), "rb") as f:
        part.write_bytes(f.read(20000))
    flip_byte(part, 12345)
    with pytest.raises(TransferError, match="crc32 differs"):
        copy_entry(key, store, dest, log=seen.append)
    assert not dest.has(key) and not part.exists()             # the bad partial copy is dropped
    copy_entry(key, store, dest, log=seen.append)               # and the next try succeeds
    assert dest.has(key) and verify_cache(dest.features_path(key)).verdict == "ok"


def test_push_to_and_pull_from_an_fsspec_url(source, tmp_path):
    pytest.importorskip("fsspec")
    store, key = source
    url = f"memory://team-{os.getpid()}"
    remote = RemoteStore(url)
    copy_entry(key[:8], store, remote, log=lambda m: None)
    assert remote.keys() == [key] and remote.record(key)["key"] == key
    mine = Store(tmp_path / "mine")
    copy_entry(key[:8], remote, mine, log=lambda m: None)
    assert verify_cache(mine.features_path(key)).verdict == "ok"
    assert same_rows(store.features_path(key), mine.features_path(key))
