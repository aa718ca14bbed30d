"""bench/train.py stays runnable: a miniature run (tiny channels/attributes) through the real
HDF5 cache, FeatureCache, RegionBank, both heads and the report."""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import train as bench_train  # noqa: E402


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
