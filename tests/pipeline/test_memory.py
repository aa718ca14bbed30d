"""Peak memory of the resident features (pipeline/resident.py) and of evaluation batches, measured
in child processes (ru_maxrss) on real HDF5 caches."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.train import write_cache
from cache.reader import FeatureCache
from heads.regions import RegionBank, prepare_regions
from pipeline.engine import EVAL_HOST_BYTES, evaluation_batch_size
from pipeline.resident import ResidentFeatures

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wide_cache(tmp_path_factory):
    """512 CUB-channel images at 7 x 7: a 100 MB float16 bank (big enough that temporaries show)."""
    return write_cache(tmp_path_factory.mktemp("wide") / "wide.h5", 512, 2048, 7, 20, 16)


def _child_peak(script: str) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_building_the_bank_adds_little_beyond_the_bank(wide_cache):
    """Under keep_freed_memory (as `msdn train` runs) a 100 MB bank used to peak ~5x its size above
    the process's footprint: float32 chunks of 256 images and float32 norms of whole chunks."""
    peak = _child_peak(f"""
        import json, resource, numpy as np, torch
        from cache.reader import FeatureCache
        from heads.runtime import keep_freed_memory
        from pipeline.resident import ResidentFeatures
        keep_freed_memory(True)
        torch.ones(1).add_(1)  # load the kernels before measuring
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
        with FeatureCache({str(wide_cache)!r}) as cache:
            store = ResidentFeatures(cache, np.arange(cache.num_images), torch.device("cpu"), "float16")
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10) - base
        print(json.dumps({{"grown": grown, "bank": store.nbytes}}))
    """)
    assert peak["bank"] == 512 * 49 * 2048 * 2
    assert peak["grown"] < 1.3 * peak["bank"] + (40 << 20), peak


def test_prepare_regions_writes_into_the_given_rows():
    maps = torch.rand(3, 5, 2, 2).half()
    out = torch.zeros(3, 4, 5, dtype=torch.float16)
    regions = prepare_regions(maps, torch.float16, out=out)
    assert regions.rows.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out.view(12, 5), prepare_regions(maps).rows)
    bank = RegionBank(maps, dtype=torch.float16)  # default chunking: the whole (small) source at once
    assert torch.equal(bank.data, out)


def test_cache_reads_into_a_given_buffer_of_the_stored_dtype(wide_cache):
    with FeatureCache(wide_cache) as cache:
        assert cache.stored_dtype == torch.float16
        out = torch.empty((3, *cache.feature_shape), dtype=torch.float16)
        assert cache.features(rows=[5, 6, 9], out=out) is out
        assert torch.equal(out, cache.lazy()[[5, 6, 9]])
        with pytest.raises(ValueError, match="out must be a contiguous CPU"):
            cache.features(rows=[5, 6], out=out)


def test_host_evaluation_batches_are_cut_to_the_memory_budget(wide_cache):
    with FeatureCache(wide_cache) as cache:
        store = ResidentFeatures(cache, np.arange(4), torch.device("cpu"), "float16")
    per_image = 49 * (2048 * 2 + 2 * 4 * 312 * 4)
    assert evaluation_batch_size(store, 312, 1024) == EVAL_HOST_BYTES // per_image < 1024
    assert evaluation_batch_size(store, 312, 10) == 10
