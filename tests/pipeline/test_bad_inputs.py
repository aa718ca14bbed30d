"""Bad inputs, one table row each: the command, the exit code it must end with (1 = refused or failed,
2 = a bad command-line value, refused by click before any work) and a piece of the one-line message.
Every row also asserts that no traceback is printed and that there is at most one "Error:" line
(`msdn ablate` reports a failed cell on its progress line and ends with exit code 1, no "Error:").

Most rows run in this process through click's CliRunner (fast); rows marked `subprocess` run the
real `python -m cli` with PYTHONPATH set to this checkout, where the process itself matters: its
exit code, or HDF5 failing to write (which ends the process without the library's teardown).

To add a row: append a BadInput to ROWS. Placeholders in `args`, `message` and `absent`:
{tmp} (a fresh folder per row, also the working folder), {tiny} (a small float32 cache with
xlsa17-style train/val locations), {f16_inf} (a float16 cache with an inf value: what float16
stores for a raw value above 65504), {nan_row} (a cache with a NaN row whose row_crc32 checksum
matches); and, when the row lists the fixture in `needs`, {demo_root} (a --data-root holding the
rendered demo images), {readonly} (a folder nothing can be written into, see `readonly_dir`),
{full} (an 8 KiB filesystem, see `full_dir`).
"""
from __future__ import annotations

import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from tests.fixtures.caches import write_tiny_cache
from tests.fixtures.verdicts import classify, record

REPO = Path(__file__).resolve().parents[2]
QUICK = ["--set", "iterations=20", "--set", "eval_every=10", "--set", "batch_size=8", "--quiet"]


@dataclass(frozen=True)
class BadInput:
    id: str
    args: tuple[str, ...]
    code: int                       # 1: refused or failed; 2: bad option value (click usage error)
    message: str                    # a piece of the one-line error
    subprocess: bool = False        # run `python -m cli` instead of CliRunner
    needs: tuple[str, ...] = ()     # fixtures the placeholders need beyond {tmp} and the caches:
                                    # "demo_root", "readonly_dir", "full_dir" (skipped where impossible)
    absent: tuple[str, ...] = ()    # paths that must not exist afterwards (nothing done / left behind)


def row(id, *args, code=1, message, **kw):
    return BadInput(id, tuple(args), code, message, **kw)


ROWS = [
    # -- 3: non-finite training stops, naming the step; refused optimiser settings
    row("train-lr-1e10", "train", "--recipe", "demo", "--cache", "{tiny}", "--out", "{tmp}/run", *QUICK,
        "--set", "lr=1e10", message="non-finite loss at step", absent=("{tmp}/run/summary.json",)),
    row("train-lr-inf", "train", "--recipe", "demo", "--cache", "{tiny}", "--out", "{tmp}/run", "--set", "lr=inf",
        message="lr must be a finite number > 0, got inf", absent=("{tmp}/run",)),
    row("train-alpha-2", "train", "--recipe", "demo", "--cache", "{tiny}", "--out", "{tmp}/run", "--set", "alpha=2",
        message="alpha must be a finite number in [0, 1), got 2.0", absent=("{tmp}/run",)),
    row("train-float16-inf", "train", "--recipe", "demo", "--cache", "{f16_inf}", "--out", "{tmp}/run", *QUICK,
        message="holds inf, which a float16 cache stores for values above 65504",
        absent=("{tmp}/run/summary.json",)),
    row("train-nan-row", "train", "--recipe", "demo", "--cache", "{nan_row}", "--out", "{tmp}/run", *QUICK,
        message="row 7 holds NaN", absent=("{tmp}/run/summary.json",)),
    row("ablate-lr-1e10", "ablate", "--recipe", "demo", "--cache", "{tiny}", "--out", "{tmp}/ab", "--ablation", "none",
        "--seeds", "0", "--workers", "1", "--set", "iterations=20", "--set", "eval_every=10", "--set", "lr=1e10",
        message="non-finite loss at step", absent=("{tmp}/ab/base/seed0/summary.json",)),
    # -- 9: one line instead of a traceback
    row("train-device-foo", "train", "--recipe", "demo", "--cache", "{tiny}", "--out", "{tmp}/run", "--device", "foo",
        code=2, message="'foo' is not a device", subprocess=True, absent=("{tmp}/run",)),
    row("extract-device-foo", "extract", "--dataset", "demo", "--out", "{tmp}/x.h5", "--device", "foo",
        code=2, message="'foo' is not a device"),
    row("push-s3-without-s3fs", "cache", "push", "0123abcd", "s3://bucket/store", "--cache-dir", "{tmp}/store",
        message="s3://bucket/store: "),
    row("push-unknown-protocol", "cache", "push", "0123abcd", "foo://x", "--cache-dir", "{tmp}/store",
        message="foo://x: ", subprocess=True),
    row("train-momentum-negative", "train", "--recipe", "demo", "--cache", "{tiny}", "--out", "{tmp}/run",
        "--set", "momentum=-1", message="momentum must be a finite number in [0, 1), got -1.0"),
    row("train-weight-decay-negative", "train", "--recipe", "demo", "--cache", "{tiny}", "--out", "{tmp}/run",
        "--set", "weight_decay=-1", message="weight_decay must be a finite number >= 0, got -1.0"),
    row("visualize-top-k-negative", "visualize", "--top-k", "-1", "--run", "{tmp}", code=2,
        message="Invalid value for '--top-k'"),
    # -- 10: the demo refuses a bad key before rendering or extracting anything
    row("demo-typo", "demo", "--out", "{tmp}/demo", "--set", "typo=1", message="unknown config key 'typo'",
        absent=("{tmp}/demo",)),
    # -- 11: numbers checked where they are parsed
    row("evaluate-gamma-nan", "evaluate", "--gamma", "nan", "--checkpoint", "{tiny}", "--cache", "{tiny}", code=2,
        message="'nan' is not a finite number"),
    row("extract-batch-size-0", "extract", "--dataset", "demo", "--out", "{tmp}/x.h5", "--batch-size", "0", code=2,
        message="Invalid value for '--batch-size': 0 is not in the range x>=1"),
    row("extract-workers-negative", "extract", "--dataset", "demo", "--out", "{tmp}/x.h5", "--workers", "-1", code=2,
        message="Invalid value for '--workers'"),
    row("train-gamma-nan", "train", "--recipe", "demo", "--cache", "{tiny}", "--out", "{tmp}/run", "--set", "gamma=nan",
        message="gamma must be a finite number, got nan"),
    row("train-lambda-nan", "train", "--recipe", "demo", "--cache", "{tiny}", "--out", "{tmp}/run",
        "--set", "lambda_cal=nan", message="must be finite numbers >= 0"),
    row("visualize-rows-negative", "visualize", "--checkpoint", "{tiny}", "--cache", "{tiny}", "--out", "{tmp}/pics",
        "--rows", "3,-1", code=2, message="values must be >= 0, got -1", absent=("{tmp}/pics",)),
    row("ablate-seed-negative", "ablate", "--recipe", "demo", "--cache", "{tiny}", "--out", "{tmp}/ab", "--seeds", "-1",
        code=2, message="values must be >= 0, got -1", absent=("{tmp}/ab",)),
    # -- 12: hints name the command-line options
    row("ablate-workers-negative", "ablate", "--recipe", "demo", "--cache", "{tiny}", "--out", "{tmp}/ab",
        "--workers", "-1", code=2, message="Invalid value for '--workers'", absent=("{tmp}/ab",)),
    row("extract-no-xlsa17", "extract", "--dataset", "CUB", "--data-root", "{tmp}", "--out", "{tmp}/x.h5",
        message="pass --xlsa17-root"),
    # -- 7: filesystem faults: one line naming the file, and what a rerun does
    row("train-readonly-out", "train", "--recipe", "demo", "--cache", "{tiny}", "--out", "{readonly}/run", *QUICK,
        message="{readonly}/run: ", needs=("readonly_dir",)),
    row("extract-readonly-out", "extract", "--dataset", "demo", "--data-root", "{demo_root}",
        "--out", "{readonly}/x.h5", "--backbone", "efficientnet_lite0", "--image-size", "64", "--device", "cpu",
        "--no-progress", message="rerun with --resume once fixed", needs=("demo_root", "readonly_dir")),
    row("extract-readonly-cache-dir", "extract", "--dataset", "demo", "--data-root", "{demo_root}",
        "--cache-dir", "{readonly}/store", "--backbone", "efficientnet_lite0", "--image-size", "64", "--device", "cpu",
        "--no-progress", message="{readonly}/store", needs=("demo_root", "readonly_dir")),
    row("demo-readonly-out", "demo", "--out", "{readonly}/demo", "--device", "cpu", "--quiet",
        message="rerun `msdn demo` once fixed", needs=("readonly_dir",)),
    row("ablate-readonly-out", "ablate", "--recipe", "demo", "--cache", "{tiny}", "--out", "{readonly}/ab",
        "--ablation", "none", "--seeds", "0", "--workers", "1", message="finished cells are kept",
        needs=("readonly_dir",)),
    row("extract-disk-full-at-creation", "extract", "--dataset", "demo", "--data-root", "{demo_root}",
        "--out", "{full}/x.h5", "--backbone", "efficientnet_lite0", "--image-size", "64", "--device", "cpu",
        "--no-progress", message="{full}/x.h5.partial.creating: No space left on device", subprocess=True,
        needs=("demo_root", "full_dir"), absent=("{full}/x.h5.partial.creating", "{full}/x.h5.partial")),
]


# ----------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    f16_inf = write_tiny_cache(root / "f16_inf.h5", dtype=np.float16)
    _rewrite_features(f16_inf, lambda fm: fm.__setitem__((5, 0, 0, 0), np.inf))
    nan_row = write_tiny_cache(root / "nan_row.h5")
    _rewrite_features(nan_row, lambda fm: fm.__setitem__(7, np.nan))
    return {"tiny": write_tiny_cache(root / "tiny.h5"), "f16_inf": f16_inf, "nan_row": nan_row}


def _rewrite_features(path: Path, edit) -> None:
    """Change feature_map in place and store checksums that match the new values."""
    with h5py.File(path, "r+") as f:
        features = f["feature_map"][()]
        edit(features)
        del f["feature_map"]
        f.create_dataset("feature_map", data=features)
        f.create_dataset("row_crc32", data=np.array(
            [zlib.crc32(np.ascontiguousarray(r).view(np.uint8).reshape(-1)) for r in features], dtype=np.uint32))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """A --data-root with the demo images rendered (seconds; nothing extracted)."""
    from extract.datasets import build_dataset
    root = tmp_path_factory.mktemp("demo_data")
    build_dataset("demo", data_root=root)
    return root


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nothing can be written into, made the strongest way this machine allows:
    1. a read-only tmpfs mounted there (needs root, as on CI): writes fail with EROFS, even for root;
    2. else, not root: a folder with mode 0o555 (EACCES);
    3. else (root without mount rights, whom modes do not stop): a regular FILE where the folder
       should be, so that creating anything inside it fails with ENOTDIR. That is not a read-only
       folder, but it sends the same OSError through the same handler."""
    path = tmp_path / "readonly"
    if _mount_tmpfs(path, "ro,size=64k"):
        yield path
        subprocess.run(["umount", str(path)], check=False)
    elif os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
    else:
        path.rmdir()
        path.write_text("a file where a folder should be\n")
        yield path


@pytest.fixture
def full_dir(tmp_path):
    """An 8 KiB tmpfs: too small even to create a feature file. Skipped where tmpfs cannot be mounted."""
    path = tmp_path / "full"
    if not _mount_tmpfs(path, "size=8k"):
        pytest.skip("cannot mount a tmpfs here (needs root): no full filesystem to test with")
    yield path
    subprocess.run(["umount", str(path)], check=False)


# ----------------------------------------------------------------------------- the table
def _run(bad: BadInput, args: list[str], cwd: Path) -> tuple[int, str]:
    if bad.subprocess:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=300)
        return done.returncode, done.stdout + done.stderr
    from cli import main
    old = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, args, catch_exceptions=True)
    finally:
        os.chdir(old)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback
        return 99, "Traceback (in-process)\n" + "".join(traceback.format_exception(result.exception))
    return result.exit_code, result.output


@pytest.mark.parametrize("bad", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(bad: BadInput, request, tmp_path, caches):
    check_row(bad, request, tmp_path, caches)


def check_row(bad: BadInput, request, tmp_path, places: dict) -> None:
    """Run one row with its placeholders filled from `places` (+ {tmp} and its `needs`), record what the
    user saw (tests/fixtures/verdicts.py), then assert it."""
    places = {"tmp": tmp_path / "work", **places}
    places["tmp"].mkdir()
    for fixture in bad.needs:
        places[fixture.removesuffix("_dir")] = request.getfixturevalue(fixture)

    def fill(text: str) -> str:
        return text.format(**{k: str(v) for k, v in places.items()})

    code, output = _run(bad, [fill(a) for a in bad.args], cwd=places["tmp"])
    verdict = classify(code, output, bad.code, any(fill(bad.message) in line for line in output.splitlines()))
    left_behind = any(Path(fill(path)).exists() for path in bad.absent)
    record(f"bad-input:{bad.id}", "other" if left_behind and verdict == "one-line" else verdict)
    assert "Traceback" not in output, output
    assert code == bad.code, output
    assert any(fill(bad.message) in line for line in output.splitlines()), output  # within one line
    assert len([line for line in output.splitlines() if line.startswith("Error:")]) <= 1, output
    for path in bad.absent:
        assert not Path(fill(path)).exists(), f"{fill(path)} exists:\n{output}"
