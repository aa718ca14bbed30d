"""The fault suite: what a user meets when a command is killed, two commands write one place, the disk
fills up, or a shared store is hostile, repeated with real `msdn` processes on tiny inputs. Each case
ends in one line (or a clean finish) and nothing already done is lost or read back damaged. The list,
with the faults other modules already repeat (referenced, not copied), is tests/fixtures/faults.py;
docs/faults.md says what the user sees. Full-disk cases mount a small tmpfs (root, as on CI) and are
skipped, saying why, where mounting is not permitted.
"""
from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cache.reader import FeatureCache
from cache.store import Store
from cache.verify import verify_cache
from tests.fixtures.caches import write_tiny_cache
from tests.fixtures.faults import FAULT_SUITE, FAULTS
from tests.fixtures.processes import reaped
from tests.fixtures.store import REPO, publish_tiny
from tests.fixtures.verdicts import classify, record
from tests.pipeline.test_bad_inputs import _mount_tmpfs
from tests.pipeline.test_hostile_inputs import folder_dataset

TRAIN = ["--recipe", "demo", "--set", "eval_every=100", "--set", "batch_size=8", "--set", "selection=fixed", "--quiet"]
EXTRACT = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--device", "cpu", "--no-progress",
           "--dtype", "float32", "--compression", "none", "--batch-size", "2", "--workers", "0"]


def msdn(*args, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def start(*args, env: dict | None = None) -> subprocess.Popen:
    """A command in its own process group (kill -9 of the group takes its workers too)."""
    return subprocess.Popen([sys.executable, "cli.py", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            start_new_session=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"ended before the fault could be injected: {proc.communicate()}"
        assert time.time() < deadline, "no progress"
        time.sleep(0.02)


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def one_line(case: str, result, *fragments: str) -> str:
    """Exit 1, no traceback, exactly one "Error:" line holding `fragments`; recorded for the counts."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    seen = len(errors) == 1 and all(f in errors[0] for f in fragments)
    record(f"fault:{case}", classify(result.returncode, result.stdout + result.stderr, 1, seen))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1 and seen, result.stderr
    return errors[0]


def finished(case: str, result) -> None:
    record(f"fault:{case}", "one-line" if result.returncode == 0 and "Traceback" not in result.stderr else "other")
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_cache(tmp_path_factory.mktemp("faults") / "tiny.h5")


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size; grow(path, size) remounts it larger."""
    mounted = []

    def mount(size: str) -> Path:
        path = tmp_path / f"disk{len(mounted)}"
        if not _mount_tmpfs(path, f"size={size}"):
            pytest.skip("cannot mount a tmpfs here (needs root): no full disk to test with")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def grow(path: Path, size: str = "16m") -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


# ----------------------------------------------------------------------------- killed, then run again
def test_a_killed_train_is_unfinished_and_the_same_command_restarts_it_with_overwrite(tiny, tmp_path):
    out = tmp_path / "run"
    command = ["train", *TRAIN, "--set", "iterations=100000", "--cache", tiny, "--out", out]
    with reaped(start(*command)) as proc:
        wait_for((out / "config.json").is_file, proc)   # the run has begun: its folder, plan and log exist
        time.sleep(0.5)
        kill_group(proc)
    assert not (out / "summary.json").exists()             # nothing half-done reads as a result
    one_line("train-killed", msdn(*command), f"{out}: already holds an unfinished run", "--overwrite to start again")
    command[command.index("iterations=100000")] = "iterations=20"
    again = msdn(*command, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "summary.json").read_text())["selection"]["iteration"] == 20


def test_a_killed_ablate_keeps_its_finished_cells_and_the_same_command_finishes(tiny, tmp_path):
    out = tmp_path / "ab"
    command = ["ablate", "--recipe", "demo", "--cache", tiny, "--out", out, "--ablation", "none", "--seeds", "0,1",
               "--workers", "1", "--set", "iterations=20", "--set", "eval_every=10", "--set", "batch_size=8"]
    first = out / "base" / "seed0" / "summary.json"
    with reaped(start(*command)) as proc:
        wait_for(first.is_file, proc)
        kill_group(proc)
    done_before = {p: p.stat().st_mtime_ns for p in out.glob("base/seed*/summary.json")}
    assert first in done_before and len(done_before) < 2
    again = msdn(*command)
    finished("ablate-killed", again)
    assert f"{len(done_before)} finished before" in again.stdout + again.stderr
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before   # kept, not recomputed
    assert len(list(out.glob("base/seed*/summary.json"))) == 2 and (out / "results.csv").is_file()


# ----------------------------------------------------------------------------- two writers
def test_two_trains_into_one_out_refuse_the_second_and_the_first_finishes(tiny, tmp_path):
    out = tmp_path / "run"
    command = ["train", *TRAIN, "--set", "iterations=1500", "--cache", tiny, "--out", out]
    with reaped(start(*command)) as proc:
        wait_for(lambda: (out / "config.json").is_file(), proc)
        one_line("train-two-writers", msdn(*command, "--overwrite"), f"{out}: another process is writing a run")
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selection"]["iteration"] == 1500 and (out / "best.pt").is_file()


# ----------------------------------------------------------------------------- a full disk
def test_a_full_disk_during_extract_keeps_the_rows_and_resume_finishes(tmp_path, tmpfs):
    data = folder_dataset(tmp_path / "data")
    disk = tmpfs("160k")   # the file is made; 16 rows of 20 KB do not fit
    command = ["extract", "--dataset", "folder", "--data-root", data, "--out", disk / "x.h5", *EXTRACT]
    one_line("extract-disk-full", msdn(*command), f"{disk / 'x.h5.partial'}: No space left on device",
             "rerun with --resume")
    with FeatureCache(disk / "x.h5.partial") as cache:
        kept = int(cache.done.sum())
    assert 0 < kept < 16 and not (disk / "x.h5").exists()
    grow(disk)
    resumed = msdn(*command, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert verify_cache(disk / "x.h5").verdict == "ok"


def test_a_full_disk_during_train_records_no_result(tiny, tmpfs):
    disk = tmpfs("24k")    # config.json and the first checkpoint fit, not the rest
    one_line("train-disk-full", msdn("train", *TRAIN, "--set", "iterations=40", "--set", "eval_every=20",
                                     "--cache", tiny, "--out", disk / "run"),
             f"{disk / 'run'}/", "No space left on device", "no result was recorded")
    assert not (disk / "run" / "summary.json").exists() and not list((disk / "run").glob("*.tmp"))


def test_a_full_disk_during_push_publishes_nothing_and_the_rerun_finishes(tmp_path, tmpfs):
    store, key = publish_tiny(tmp_path / "store", tmp_path / "work", n=16)
    disk = tmpfs("64k")   # the entry holds ~180 KB
    command = ["cache", "push", key[:10], disk / "team", "--cache-dir", store.root]
    one_line("push-disk-full", msdn(*command), "features.h5.part: No space left on device", "nothing half-copied")
    assert not Store(disk / "team").has(key)
    grow(disk)
    again = msdn(*command)
    assert again.returncode == 0 and "resuming features.h5" in again.stderr, again.stderr
    assert verify_cache(Store(disk / "team").features_path(key)).verdict == "ok"


# ----------------------------------------------------------------------------- hostile stores
@pytest.fixture(scope="module")
def source(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile_store")
    return publish_tiny(base / "store", base / "work", n=4)


@pytest.mark.parametrize("form", ["absolute-path", "fsspec-url", "symlink-out"])
def test_hostile_pulls_are_one_line_and_write_nothing(source, tmp_path, form):
    from tests.cache.test_transfer import escapes, hostile_store
    store, key = source
    if form == "absolute-path":
        target = tmp_path / "elsewhere" / "abs.txt"
        team = hostile_store(store, key, tmp_path / "team", str(target), target).root
        target.unlink()   # a naive copy would write it back
        message = "refused file name"
    elif form == "fsspec-url":
        pytest.importorskip("fsspec")
        name, payload_at, target = escapes(tmp_path)
        hostile_store(store, key, tmp_path / "team" / "store", name, payload_at)
        team, message = f"file://{tmp_path / 'team' / 'store'}", "refused file name"
    else:
        team_store = Store(tmp_path / "team")
        team_store.entry_dir(key).parent.mkdir(parents=True)
        import shutil
        shutil.copytree(store.entry_dir(key), team_store.entry_dir(key))
        secret = tmp_path / "secret.h5"
        shutil.move(team_store.features_path(key), secret)
        team_store.features_path(key).symlink_to(secret)
        team, target, message = team_store.root, tmp_path / "mine" / "entries" / key, "outside"
    mine = tmp_path / "mine"
    one_line(f"pull-{form}", msdn("cache", "pull", key[:10], team, "--cache-dir", mine), message)
    assert not target.exists() and not Store(mine).has(key)


# ----------------------------------------------------------------------------- the list itself
def test_every_fault_of_the_list_names_a_test_that_exists_and_is_in_the_docs():
    documented = (REPO / "docs" / "faults.md").read_text()
    for fault in FAULTS:
        assert f"| `{fault.id}` |" in documented, fault.id
        path, name = fault.test.split("::")
        function = name.split("[")[0]
        tree = ast.parse((REPO / path).read_text())
        assert function in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, fault.id
        if path == FAULT_SUITE:
            assert function in globals(), fault.id
