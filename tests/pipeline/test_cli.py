"""The `msdn train` / `msdn evaluate` console commands, run as real subprocesses."""
import json
import subprocess

import pytest

from tests.fixtures.caches import write_tiny_cache

QUICK = ["--set", "iterations=20", "--set", "eval_every=10", "--set", "batch_size=8", "--set", "lr=3e-3"]


def msdn(*args, cwd):
    return subprocess.run(["msdn", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cache = write_tiny_cache(root / "tiny.h5")
    done = msdn("train", "--recipe", "demo", "--cache", cache, "--out", "runs/x", *QUICK,
                "--set", "lambda_causal=0.3", "--quiet", "--deterministic", cwd=root)
    assert done.returncode == 0, done.stderr
    return root, cache, done.stdout


def test_train_prints_the_results_table_and_writes_the_run(cli_run):
    root, _, stdout = cli_run
    assert "validation (selected)" in stdout and "AUSUC" in stdout and "gamma" in stdout
    assert json.loads((root / "runs" / "x" / "config.json").read_text())["head"]["lambda_causal"] == 0.3


def test_evaluate_reads_the_checkpoint_back(cli_run):
    root, cache, _ = cli_run
    done = msdn("evaluate", "--checkpoint", "runs/x/best.pt", "--cache", cache, "--out", "runs/eval", cwd=root)
    assert done.returncode == 0, done.stderr
    assert "test, gamma=0 (bias only)" in done.stdout
    evaluated = json.loads((root / "runs" / "eval" / "summary.json").read_text())
    trained = json.loads((root / "runs" / "x" / "summary.json").read_text())
    assert evaluated["test"]["H"] == trained["test"]["H"]


def test_evaluate_refuses_another_cache_in_one_line(cli_run):
    root, _, _ = cli_run
    other = write_tiny_cache(root / "other.h5", content_key="other")
    done = msdn("evaluate", "--checkpoint", "runs/x/best.pt", "--cache", other, cwd=root)
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1
    assert "content key" in done.stderr and "other.h5" in done.stderr


def test_unknown_override_is_refused_before_any_work(cli_run):
    root, cache, _ = cli_run
    done = msdn("train", "--recipe", "demo", "--cache", cache, "--out", "r", "--set", "lambda_causl=0.3", cwd=root)
    assert done.returncode != 0
    assert done.stderr.strip() == "Error: --set: unknown config key 'lambda_causl' (did you mean 'lambda_causal'?)"
    assert not (root / "r").exists()


def test_filesystem_faults_are_named_by_file_and_reason():
    """h5py reports a failed write as a RuntimeError whose text names the file; a close that fails
    after it hides it as its context. Plain OSErrors carry the file themselves."""
    from pipeline.errors import filesystem_fault

    write = RuntimeError("Can't synchronously write data (file write failed: time = Tue Dec  1 01:11:21 2026\n"
                         ", filename = 'out/x.h5.partial', file descriptor = 3, errno = 28, error message = "
                         "'No space left on device', buf = 0x1, total write size = 9882)")
    try:
        try:
            raise write
        except RuntimeError:
            raise RuntimeError("Can't destroy cache (slist already enabled?)")
    except RuntimeError as err:
        assert filesystem_fault(err) == ("out/x.h5.partial: No space left on device", True)
    assert filesystem_fault(PermissionError(13, "Permission denied", "runs/x")) == ("runs/x: Permission denied", False)
    assert filesystem_fault(RuntimeError("a bug, not the filesystem")) is None
