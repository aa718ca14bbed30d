"""Distributed extraction as users run it: `torchrun --nproc-per-node 2 cli.py extract` on CPU (gloo),
16 real CUB photos, the real EfficientNet-Lite0. The joined result equals a one-process extraction row
for row (same batch size and one thread per process, as torchrun sets), with the same content key; a
rank killed mid-shard leaves its rows, and the rerun computes only the missing ones."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.layout import partial_path
from cache.reader import CacheError, FeatureCache
from cache.shards import shard_path
from cache.store import Store
from cache.verify import verify_cache
from extract.backbones import BackboneSpec
from extract.datasets import build_dataset
from extract.distributed import shard_bounds, shard_dataset
from extract.extractor import extract_features
from tests.fixtures.images import mini_cub
from tests.fixtures.processes import reaped

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data):
    root = mini_cub(tmp_path_factory.mktemp("cub"), shared_data, per_class=4)
    dataset = build_dataset("CUB100", data_root=root, xlsa17_root=shared_data / "xlsa17",
                            w2v_root=shared_data / "attribute_w2v")
    return root, dataset


def reference(dataset, size, batch, tmp_path):
    """One process, same batch size, one thread (what torchrun gives each rank)."""
    out = extract_features(dataset, BackboneSpec("efficientnet_lite0", size, "imagenet"), tmp_path / f"ref{size}.h5",
                           batch_size=batch, num_workers=0, num_threads=1, device="cpu", progress=False,
                           log=lambda msg: None)
    with FeatureCache(out) as cache:
        return cache.features(), cache.content_key


def extract_args(data_root, shared_data, size, batch, *extra):
    return ["cli.py", "extract", "--dataset", "CUB100", "--data-root", str(data_root),
            "--xlsa17-root", str(shared_data / "xlsa17"), "--w2v-root", str(shared_data / "attribute_w2v"),
            "--backbone", "efficientnet_lite0", "--image-size", str(size), "--batch-size", str(batch),
            "--workers", "0", "--device", "cpu", "--no-progress", *map(str, extra)]


def test_shards_cover_the_rows_once_with_splits_reindexed(data):
    _, dataset = data
    bounds = [shard_bounds(dataset.num_images, 3, r) for r in range(3)]
    assert bounds[0][0] == 0 and bounds[-1][1] == dataset.num_images
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    lo, hi = bounds[1]
    shard = shard_dataset(dataset, lo, hi)
    assert shard.image_paths == dataset.image_paths[lo:hi] and shard.name == dataset.name
    for key, loc in dataset.splits.items():
        assert np.array_equal(shard.splits[key] + lo, loc[(loc >= lo) & (loc < hi)])


def test_two_gloo_ranks_give_the_one_process_entry_row_for_row(data, shared_data, tmp_path):
    data_root, dataset = data
    store = tmp_path / "store"
    run = subprocess.run([*TORCHRUN, *extract_args(data_root, shared_data, 96, 2, "--cache-dir", store)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    expected, key = reference(dataset, 96, 2, tmp_path)
    assert run.stdout.split() == [key]                      # one key, printed once, = one-process key
    assert "[rank 1/2] rows [8, 16) of 16" in run.stderr and "joined 2 shards" in run.stderr
    entry = Store(store)
    assert entry.keys() == [key]
    record = entry.record(key)
    assert record["virtual"] and set(record["files"]) == {
        "features.h5", "features.h5.shard-0-of-2.h5", "features.h5.shard-1-of-2.h5"}
    with FeatureCache(entry.features_path(key)) as cache:
        assert cache.complete and cache.content_key == key
        assert cache.manifest["compute"]["world_size"] == 2 and cache.manifest["compute"]["backend"] == "gloo"
        assert np.array_equal(cache.labels, dataset.labels) and cache.image_paths == dataset.image_paths
        assert torch.equal(cache.features(), expected)
    assert verify_cache(entry.features_path(key)).verdict == "ok"


def _done(path: Path) -> int:
    try:
        with FeatureCache(path) as cache:
            return int(cache.done.sum())
    except CacheError:
        return 0


def _rank_pid(parent: int, rank: int) -> int | None:
    """The worker process torchrun started for `rank` (read from its environment)."""
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            if f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except OSError:  # exited meanwhile
            continue
    return None


def test_a_killed_rank_leaves_its_shard_and_the_rerun_does_only_the_missing_rows(data, shared_data, tmp_path):
    data_root, dataset = data
    out = tmp_path / "cub.h5"
    args = [*TORCHRUN, *extract_args(data_root, shared_data, 224, 1, "--out", out, "--materialize")]
    shard1 = partial_path(shard_path(out, 1, 2))
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with reaped(proc):
        deadline = time.time() + 180
        while _done(shard1) < 1:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and not out.exists()
    kept = _done(shard1)
    assert 1 <= kept < 8, err[-2000:]

    rerun = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"[rank 1/2] extracting {8 - kept} of 8 images" in rerun.stderr     # only the missing rows
    expected, key = reference(dataset, 224, 1, tmp_path)
    with FeatureCache(out) as cache:
        assert cache.complete and cache.content_key == key and not cache.file["feature_map"].is_virtual
        assert torch.equal(cache.features(), expected)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("cub.h5")) == ["cub.h5"]
    assert verify_cache(out).verdict == "ok"
