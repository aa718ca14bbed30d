"""push/pull between stores with real processes: a push killed mid-copy resumes from its partial file
and ends verified; a copy damaged in flight is caught before it is published; fsspec URLs work."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib

import pytest
import torch

from cache.reader import CacheError, FeatureCache
from cache.store import Store
from cache.transfer import RemoteStore, TransferError, copy_entry
from cache.verify import verify_cache
from tests.fixtures.processes import reaped
from tests.fixtures.store import REPO, flip_byte, publish_tiny, run_cli


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
    with reaped(proc):
        deadline = time.time() + 90
        while not (part.exists() and part.stat().st_size > total // 4):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
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


# ----------------------------------------------------------------------------- hostile records
def hostile_store(store, key, root, name, payload_at=None):
    """A copy of `store`'s entry `key` in a new store at `root` whose record also names the file `name`
    (with the size and crc32 of a payload placed at `payload_at`, where a naive reader would find it)."""
    entry = root / "entries" / key
    shutil.copytree(store.entry_dir(key), entry)
    payload = b"written by a stranger\n"
    if payload_at is not None:
        payload_at.parent.mkdir(parents=True, exist_ok=True)
        payload_at.write_bytes(payload)
    record = json.loads((entry / "entry.json").read_text())
    record["files"][name] = {"bytes": len(payload), "crc32": zlib.crc32(payload)}
    (entry / "entry.json").write_text(json.dumps(record))
    return Store(root)


def escapes(tmp_path):
    """A relative name that leads from a source entry (3 levels deeper than the destination's
    staging folder) to a file beside the destination store."""
    return "../../../escaped.txt", tmp_path / "team" / "escaped.txt", tmp_path / "escaped.txt"


def test_a_pull_refuses_file_names_that_lead_out_of_the_store(source, tmp_path):
    store, key = source
    name, payload_at, target = escapes(tmp_path)
    team = hostile_store(store, key, tmp_path / "team" / "store", name, payload_at)
    mine = Store(tmp_path / "mine")
    with pytest.raises(CacheError, match=r"entry\.json: refused file name '\.\./\.\./\.\./escaped\.txt'"):
        copy_entry(key, team, mine, log=lambda m: None)
    assert not target.exists() and not target.with_name("escaped.txt.part").exists() and not mine.has(key)
    result = run_cli("cache", "pull", key[:10], team.root, "--cache-dir", mine.root)   # as a user sees it
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "refused file name" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not target.exists() and not mine.has(key)


def test_a_pull_refuses_absolute_file_names(source, tmp_path):
    store, key = source
    target = tmp_path / "elsewhere" / "abs.txt"
    team = hostile_store(store, key, tmp_path / "team", str(target), target)
    target.unlink()   # a naive copy would write it back
    with pytest.raises(CacheError, match="refused file name"):
        copy_entry(key, team, Store(tmp_path / "mine"), log=lambda m: None)
    assert not target.exists() and not target.with_name("abs.txt.part").exists()


def test_a_push_does_not_pass_a_hostile_record_on(source, tmp_path):
    store, key = source
    name, payload_at, target = escapes(tmp_path)
    mine = hostile_store(store, key, tmp_path / "team" / "store", name, payload_at)
    with pytest.raises(CacheError, match="refused file name"):
        copy_entry(key, mine, Store(tmp_path / "dest"), log=lambda m: None)
    assert not Store(tmp_path / "dest").has(key) and not target.exists()


def test_publish_refuses_hostile_file_names(source, tmp_path):
    store, key = source
    dest = Store(tmp_path / "dest")
    stage = dest.staging("copy", key)
    shutil.copyfile(store.features_path(key), stage / "features.h5")
    (tmp_path / "outside.txt").write_text("x")
    files = {**store.record(key)["files"], "../../../outside.txt": {"bytes": 1, "crc32": zlib.crc32(b"x")}}
    with pytest.raises(CacheError, match="refused file name"):
        dest.publish(stage, key, store.record(key)["manifest"], files=files)
    assert not dest.has(key)
    (stage / "notes.txt").write_text("not a file the store writes")
    with pytest.raises(CacheError, match="notes.txt"):
        dest.publish(stage, key, store.record(key)["manifest"])
    assert not dest.has(key)


def test_a_symlink_out_of_an_entry_is_refused(source, tmp_path):
    store, key = source
    team = Store(tmp_path / "team")
    shutil.copytree(store.entry_dir(key), team.entry_dir(key))
    secret = tmp_path / "secret.h5"
    shutil.move(team.features_path(key), secret)
    team.features_path(key).symlink_to(secret)
    with pytest.raises(CacheError, match="outside"):
        copy_entry(key, team, Store(tmp_path / "mine"), log=lambda m: None)


def test_fsspec_stores_refuse_hostile_file_names(source, tmp_path):
    pytest.importorskip("fsspec")
    store, key = source
    name, payload_at, target = escapes(tmp_path)
    hostile_store(store, key, tmp_path / "team" / "store", name, payload_at)
    remote = RemoteStore(f"file://{tmp_path / 'team' / 'store'}")
    with pytest.raises(CacheError, match="refused file name"):       # pull from an fsspec store
        copy_entry(key, remote, Store(tmp_path / "mine"), log=lambda m: None)
    with pytest.raises(CacheError, match="refused file name"):       # and from it to another one
        copy_entry(key, remote, RemoteStore(f"file://{tmp_path / 'dest'}"), log=lambda m: None)
    assert not target.exists() and not (tmp_path / "dest").exists()
    with pytest.raises(CacheError, match="refused file name"):
        remote.open_entry_file(key, "/etc/passwd")
    absolute = tmp_path / "abs" / "x.txt"
    hostile_store(store, key, tmp_path / "team2", str(absolute))
    with pytest.raises(CacheError, match="refused file name"):
        copy_entry(key, RemoteStore(f"file://{tmp_path / 'team2'}"), Store(tmp_path / "mine"), log=lambda m: None)
    assert not absolute.exists() and not absolute.parent.exists()
    # a healthy fsspec file:// store still copies both ways
    good = RemoteStore(f"file://{tmp_path / 'good'}")
    copy_entry(key, store, good, log=lambda m: None)
    copy_entry(key, good, Store(tmp_path / "mine"), log=lambda m: None)
    assert verify_cache(Store(tmp_path / "mine").features_path(key)).verdict == "ok"
