"""bench/train.py stays runnable: a miniature run (tiny channels/attributes) through the real
HDF5 cache, FeatureCache, RegionBank, both heads and the report."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import train as bench_train  # noqa: E402
from heads.runtime import keep_freed_memory  # noqa: E402


@pytest.fixture(autouse=True)
def restore_process_settings():
    """The bench sets torch's thread count and the allocator for the whole process; later tests in this
    process (e.g. an in-process extraction compared bit for bit with a CLI subprocess's) need them back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    keep_freed_memory(False)


@pytest.mark.slow
def test_bench_train_miniature_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = bench_train.main(["--device", "cpu", "--images", "40", "--grids", "3,2", "--steps", "1",
                               "--rounds", "1", "--eval-images", "12", "--eval-batch", "5",
                               "--channels", "16", "--attributes", "6", "--classes", "8",
                               "--threads", "1", "--wait-idle", "0", "--json", str(out)])
    assert json.loads(out.read_text())["grids"].keys() == {"3x3", "2x2"}
    for grid in report["grids"].values():
        assert grid["project_vs_reference_first_batch_rel_diff"] < 1e-2
        assert set(grid["paths"]) == {"project-bf16", "project-fp32", "reference"}
        for path in grid["paths"].values():
            for key in ("train_samples_per_s", "eval_images_per_s", "train_fraction_of_matmul",
                        "train_speedup_vs_reference", "cub_recipe_minutes"):
                assert math.isfinite(path[key]) and path[key] > 0, key
    assert "project-bf16" in capsys.readouterr().out
