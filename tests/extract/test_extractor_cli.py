"""`msdn extract` as a user runs it: a real subprocess killed with SIGKILL mid-run and resumed, Ctrl-C,
and one-line errors for bad paths and images. Data: 40 real CUB photos of 4 species (tests/fixtures/images.py)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from cache.layout import partial_path
from cache.reader import CacheError, FeatureCache
from extract.backbones import BackboneSpec
from extract.datasets import build_dataset
from extract.extractor import extract_features
from tests.fixtures.images import mini_cub
from tests.fixtures.processes import default_sigint, reaped

REPO = Path(__file__).resolve().parents[2]
SPEC = BackboneSpec("efficientnet_lite0", 224, "imagenet")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, shared_data):
    return mini_cub(tmp_path_factory.mktemp("cub"), shared_data, per_class=10)


def cli_args(data_root, shared_data, out, *extra, size=SPEC.image_size):
    return ["extract", "--dataset", "CUB100", "--data-root", str(data_root),
            "--xlsa17-root", str(shared_data / "xlsa17"), "--w2v-root", str(shared_data / "attribute_w2v"),
            "--backbone", SPEC.name, "--image-size", str(size), "--batch-size", "2",
            "--workers", "0", "--no-progress", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def reference(data_root, shared_data, tmp_path_factory):
    """An uninterrupted extraction with the same options, in this process."""
    dataset = build_dataset("CUB100", data_root=data_root, xlsa17_root=shared_data / "xlsa17",
                            w2v_root=shared_data / "attribute_w2v")
    out = extract_features(dataset, SPEC, tmp_path_factory.mktemp("ref") / "ref.h5", batch_size=2,
                           num_workers=0, progress=False, log=lambda msg: None)
    with FeatureCache(out) as cache:
        return cache.features(), cache.content_key


def done_rows(path: Path) -> int:
    """Done rows of a file another process is writing (opened as an SWMR reader)."""
    try:
        with FeatureCache(path) as cache:
            return int(cache.done.sum())
    except CacheError:  # not created yet
        return 0


def start_and_stop(args, out, sig, at_least=6, timeout=180, env=None):
    proc = subprocess.Popen([sys.executable, "cli.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            preexec_fn=default_sigint)
    deadline = time.time() + timeout
    with reaped(proc):
        while done_rows(partial_path(out)) < at_least:
            assert proc.poll() is None, f"extraction ended before it could be interrupted: {proc.communicate()}"
            assert time.time() < deadline, "extraction made no progress"
            time.sleep(0.02)
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def run_cli(args):
    return subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_killed_run_resumes_without_recomputing_and_matches_an_uninterrupted_run(
        data_root, shared_data, reference, tmp_path):
    out = tmp_path / "cub.h5"
    args = cli_args(data_root, shared_data, out)
    returncode, _ = start_and_stop(args, out, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    assert not out.exists()                                  # the final name appears only when complete
    expected, key = reference
    with FeatureCache(partial_path(out)) as cache:           # readable although its writer was killed
        done = cache.done.copy()
        assert 6 <= done.sum() < 40 and cache.content_key == key
        assert torch.equal(cache.features(rows=np.flatnonzero(done)), expected[torch.from_numpy(done)])

    resumed = run_cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"extracting {40 - done.sum()} of 40" in resumed.stderr  # done rows were not recomputed
    with FeatureCache(out) as cache:
        assert cache.complete and cache.content_key == key
        assert torch.equal(cache.features(), expected)
    assert not partial_path(out).exists()

    before = out.stat().st_mtime_ns
    again = run_cli(args)
    assert again.returncode == 0 and "up to date" in again.stderr and out.stat().st_mtime_ns == before


def test_ctrl_c_closes_the_file_cleanly(data_root, shared_data, tmp_path):
    out = tmp_path / "cub.h5"
    # 448 px on one thread: the 38 rows after the second take seconds, so on an idle machine the
    # run cannot finish between the check and the signal (at 224 px it once did, exiting 0)
    returncode, err = start_and_stop(cli_args(data_root, shared_data, out, size=448), out, signal.SIGINT,
                                     at_least=2, env={"OMP_NUM_THREADS": "1"})
    assert returncode == 130 and "--resume" in err and "Traceback" not in err
    with h5py.File(partial_path(out), "r") as f:             # plain open: no "being written" flag left
        assert 2 <= f["done"][:].sum() < 40


def _invoke(args):
    result = CliRunner().invoke(cli.main, args)
    lines = result.output.strip().splitlines()
    return result.exit_code, lines


def test_missing_images_are_one_line_before_any_work(data_root, shared_data, tmp_path):
    gone = sorted((data_root / "cub100_subset" / "images").rglob("*.jpg"))[:7]
    backup = [(p, p.read_bytes()) for p in gone]
    try:
        for p in gone:
            p.unlink()
        code, lines = _invoke(cli_args(data_root, shared_data, tmp_path / "x.h5"))
    finally:
        for p, data in backup:
            p.write_bytes(data)
    assert code == 1 and len(lines) == 1
    assert "7 of 40 image files missing" in lines[0] and gone[0].name in lines[0] and ", ..." in lines[0]
    assert not partial_path(tmp_path / "x.h5").exists()


@pytest.mark.parametrize("option,value,message", [
    ("--xlsa17-root", "/nonexistent/xlsa17", "att_splits.mat"),
    ("--data-root", "/nonexistent/data", "/nonexistent/data"),
    ("--weights", "/nonexistent/lite0.pth", "lite0.pth"),
])
def test_wrong_paths_are_one_line_errors(data_root, shared_data, tmp_path, option, value, message):
    args = cli_args(data_root, shared_data, tmp_path / "x.h5")
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    code, lines = _invoke(args)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0]


def test_mismatched_word_vectors_are_one_line(data_root, shared_data, tmp_path):
    w2v = tmp_path / "w2v"
    w2v.mkdir()
    np.save(w2v / "CUB_attribute_w2v.npy", np.zeros((311, 300)))       # CUB has 312 attributes
    args = cli_args(data_root, shared_data, tmp_path / "x.h5")
    args[args.index("--w2v-root") + 1] = str(w2v)
    code, lines = _invoke(args)
    assert code == 1 and len(lines) == 1 and "(311, 300)" in lines[0] and "CUB_attribute_w2v.npy" in lines[0]


def test_bad_image_via_cli_names_the_file(data_root, shared_data, tmp_path):
    victim = sorted((data_root / "cub100_subset" / "images").rglob("*.jpg"))[3]
    original = victim.read_bytes()
    try:
        victim.write_bytes(original[: len(original) // 3])
        code, lines = _invoke(cli_args(data_root, shared_data, tmp_path / "x.h5", size=64))
        assert code == 1 and victim.name in lines[-1] and "--skip-bad" in lines[-1]
        code, lines = _invoke(cli_args(data_root, shared_data, tmp_path / "y.h5", "--skip-bad", size=64))
        assert code == 0
        with FeatureCache(tmp_path / "y.h5") as cache:
            assert np.flatnonzero(cache.skipped).tolist() == [3] and cache.done.sum() == 39
    finally:
        victim.write_bytes(original)


def test_skip_bad_speaks_on_stderr_and_keeps_skipped_rows_out_of_the_splits(data_root, shared_data, tmp_path):
    victim = sorted((data_root / "cub100_subset" / "images").rglob("*.jpg"))[3]
    original = victim.read_bytes()
    try:
        victim.write_bytes(original[: len(original) // 3])
        result = run_cli(cli_args(data_root, shared_data, tmp_path / "y.h5", "--skip-bad", size=64))
    finally:
        victim.write_bytes(original)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""                                       # stdout stays clean for pipes
    assert f"skipped {victim}" in result.stderr and "1 unreadable image(s)" in result.stderr
    assert "left out of the split locations" in result.stderr
    with h5py.File(tmp_path / "y.h5", "r") as f:
        assert all(3 not in f[k][()] for k in ("trainval_loc", "test_seen_loc", "test_unseen_loc"))


def test_a_second_extraction_of_the_same_out_is_refused_while_the_first_runs(data_root, shared_data, tmp_path):
    """Two real processes: the second, with --resume or without, refuses in one line and leaves the
    first one's live partial file alone; once the first is gone its lock can be taken."""
    out = tmp_path / "cub.h5"
    args = cli_args(data_root, shared_data, out, size=64)
    first = subprocess.Popen([sys.executable, "cli.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "MSDN_EXTRACT_THROTTLE_S": "60"})  # killed long before the end
    with reaped(first):
        deadline = time.time() + 300
        while done_rows(partial_path(out)) < 2:
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline, "the first extraction made no progress"
            time.sleep(0.1)
        inode = partial_path(out).stat().st_ino
        for extra in ([], ["--resume"]):
            second = run_cli([*args, *extra])
            lines = second.stderr.strip().splitlines()
            assert second.returncode == 1 and len(lines) == 1, second.stderr
            assert lines[0].startswith(f"Error: {out}: another process is writing it (pid {first.pid} on ")
            assert first.poll() is None                               # the first one goes on...
            assert partial_path(out).stat().st_ino == inode           # ...on its own file, untouched
        before = done_rows(partial_path(out))
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    assert before >= 2 and not out.exists()
    from cache.writer import output_lock
    with output_lock(out) as lock:                                    # a killed writer's lock is free
        assert lock == out.with_name("cub.h5.lock") and "pid" in lock.read_text()
    assert not out.with_name("cub.h5.lock").exists()                  # and removed when released
