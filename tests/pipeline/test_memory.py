"""Peak memory of the resident features (pipeline/features.py) and of evaluation batches, measured
in child processes (ru_maxrss) on real HDF5 caches."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.train import write_cache
from cache.reader import FeatureCache
from heads.regions import prepare_regions
from pipeline.engine import EVAL_HOST_BYTES, evaluation_batch_size
from pipeline.config import ConfigError
from pipeline.features import RegionBank, ResidentFeatures

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wide_cache(tmp_path_factory):
    """512 CUB-channel images at 7 x 7: a 100 MB float16 bank (big enough that temporaries show)."""
    return write_cache(tmp_path_factory.mktemp("wide") / "wide.h5", 512, 2048, 7, 20, 16)


def _child_peak(script: str) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)  # seconds on an idle machine; minutes on a loaded one
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_building_the_bank_adds_little_beyond_the_bank(wide_cache):
    """Under keep_freed_memory (as `msdn train` runs) a 100 MB bank used to peak ~5x its size above
    the process's footprint: float32 chunks of 256 images and float32 norms of whole chunks."""
    peak = _child_peak(f"""
        import json, resource, numpy as np, torch
        from cache.reader import FeatureCache
        from heads.runtime import keep_freed_memory
        from pipeline.features import ResidentFeatures
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


def test_streaming_delivers_the_resident_batches_bit_for_bit(tiny_cache):
    from pipeline.samplers import build_sampler
    from pipeline.streaming import StreamingFeatures
    with FeatureCache(tiny_cache) as cache:
        rows = np.arange(cache.num_images)
        resident = ResidentFeatures(cache, rows, torch.device("cpu"), "float16")
        streaming = StreamingFeatures(cache, rows, torch.device("cpu"), "float16")
        labels = torch.as_tensor(cache.labels)
        pairs = [store.training_batches(store.positions(rows[::2]), build_sampler("uniform", labels[::2], 7, 3),
                                        steps=9, batch_size=7) for store in (resident, streaming)]
        for (picked_r, batch_r), (picked_s, batch_s) in zip(*pairs, strict=True):
            assert torch.equal(picked_r, picked_s) and torch.equal(batch_r.rows, batch_s.rows)
        eval_positions = resident.positions(rows[5:40])
        for batch_r, batch_s in zip(resident.batches(eval_positions, 8), streaming.batches(eval_positions, 8),
                                    strict=True):
            assert torch.equal(batch_r.rows, batch_s.rows)


def test_a_streamed_run_gives_the_resident_run_numbers(tiny_cache, tmp_path, monkeypatch):
    """Streamed from the file (MSDN_FEATURE_STORE=streaming: the tiny bank is smaller than streaming's
    read-ahead, so no --max-memory would choose it), training and evaluation give the same metrics."""
    from pipeline.evaluate import evaluate
    from pipeline.runlog import read_metrics
    from pipeline.train import train
    from tests.fixtures.caches import tiny_config
    config = tiny_config(iterations=30, eval_every=10, lambda_causal=0.5)
    messages = []
    resident = train(config, tiny_cache, tmp_path / "resident", progress=False, max_memory="64G")
    with pytest.raises(ConfigError, match=r"--max-memory 1K: below the ~.* GB this run needs even streaming .* "
                                          r"pass at least \d+M, or auto"):
        train(config, tiny_cache, tmp_path / "too-small", progress=False, max_memory="1K")
    assert not (tmp_path / "too-small").exists()  # refused before the run folder is made
    monkeypatch.setenv("MSDN_FEATURE_STORE", "streaming")
    streamed = train(config, tiny_cache, tmp_path / "streamed", progress=False, log=messages.append)
    assert resident["feature_store"]["mode"] == "resident" and streamed["feature_store"]["mode"] == "streaming"
    assert messages and messages[0].startswith("features: streaming") and "MSDN_FEATURE_STORE" in messages[0]
    plan = json.loads((tmp_path / "streamed" / "config.json").read_text())["run"]["features"]
    assert plan["mode"] == "streaming" and plan["reason"] == "MSDN_FEATURE_STORE=streaming"
    strip = lambda rs: [{k: v for k, v in r.items() if k != "losses"} | {"loss": r["losses"]["loss"]} for r in rs]
    assert strip(read_metrics(tmp_path / "streamed" / "metrics.jsonl")) == \
        strip(read_metrics(tmp_path / "resident" / "metrics.jsonl"))
    assert streamed["test"] == resident["test"] and streamed["selection"] == {**resident["selection"],
        "train_seconds": streamed["selection"]["train_seconds"], "eval_seconds": streamed["selection"]["eval_seconds"]}
    evaluated = evaluate(tmp_path / "streamed" / "best.pt", tiny_cache, out_dir=tmp_path / "eval")
    assert evaluated["test"] == {k: resident["test"][k] for k in evaluated["test"]}
    assert json.loads((tmp_path / "eval" / "config.json").read_text())["features"]["mode"] == "streaming"


def test_cli_streams_and_says_so(tiny_cache, tmp_path):
    done = subprocess.run(["msdn", "train", "--recipe", "demo", "--cache", str(tiny_cache), "--out", "run", "--quiet",
                           "--set", "iterations=4", "--set", "eval_every=2",
                           "--set", "batch_size=8", "--set", "selection=fixed"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MSDN_FEATURE_STORE": "streaming"})
    assert done.returncode == 0, done.stderr
    assert "features: streaming" in done.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["run"]["features"]["mode"] == "streaming"
    bad = subprocess.run(["msdn", "train", "--recipe", "demo", "--cache", str(tiny_cache), "--out", "bad",
                          "--max-memory", "lots"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--max-memory: 'lots' is not a size" in bad.stderr
    assert "Traceback" not in bad.stderr
