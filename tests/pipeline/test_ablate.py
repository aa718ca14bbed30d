"""`msdn ablate`: a real 2 x 2 grid x 2 seeds of `msdn train` subprocesses on the tiny cache, one
cell broken on purpose; re-runs; the written tables read back."""
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.commands.ablate import PRESETS, AblateOptions, run_ablate
from pipeline.commands.ablate.grid import (
    VALIDATED_CAUSAL,
    AblationError,
    builtin_ablations,
    cell_state,
    parse_grid,
    plan_cells,
)
from pipeline.commands.ablate.workers import Worker
from pipeline.config import load_recipe
from tests.fixtures.caches import write_tiny_cache
from tests.fixtures.processes import default_sigint

QUICK = ["iterations=20", "eval_every=10", "log_every=10", "batch_size=8", "lr=3e-3", "eval_batch_size=16"]
GRID = ["lambda_cal=0.05,0.1", "fusion=[0.9,0.1],[0.5,0.5]"]
SCORES = ["ZSL", "U", "S", "H", "AUSUC"]


def options(root, **kw):
    base = dict(out=str(root / "ablation"), recipe="demo", cache=str(root / "tiny.h5"), grid=GRID, seeds=[0, 1],
                overrides=QUICK, workers=2, device="cpu")
    return AblateOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """8 cells on 2 CPU workers; the cell (lambda_cal=0.1, fusion [0.5,0.5], seed 1) cannot write its
    metrics file (a folder stands in the way), so its `msdn train` fails for real."""
    root = tmp_path_factory.mktemp("ablate")
    write_tiny_cache(root / "tiny.h5")
    cells = plan_cells("demo", root / "ablation", grid=GRID, seeds=[0, 1], overrides=QUICK)
    broken = next(c.dir for c in cells if c.variant == "lambda_cal=0.1|fusion=[0.5,0.5]" and c.seed == 1)
    (broken / "metrics.jsonl").mkdir(parents=True)
    log = []
    result = run_ablate(options(root), log=log.append)
    return root, broken, result, log


def test_grid_of_2x2_variants_and_2_seeds_gives_an_8_run_frame(grid_run):
    _, _, result, _ = grid_run
    runs = result["runs"]
    assert len(runs) == 8
    assert list(runs.columns[:3]) == ["ablation", "lambda_cal", "fusion"]  # the factors, for pandas pivots
    assert {"variant", "seed", "status", *SCORES, "gamma", "iteration", "train_s", "wall_s", "cpu_s", "error",
            "dir"} <= set(runs.columns)
    assert sorted(runs["variant"].unique()) == sorted(f"lambda_cal={a}|fusion={f}" for a in ("0.05", "0.1")
                                                      for f in ("[0.9,0.1]", "[0.5,0.5]"))
    assert runs.groupby("variant")["seed"].apply(lambda seeds: sorted(seeds) == [0, 1]).all()
    done = runs[runs["status"] == "done"]
    assert len(done) == 7 and done[SCORES + ["train_s", "wall_s", "cpu_s"]].notna().all().all()
    assert ((done[SCORES] >= 0) & (done[SCORES] <= 100)).all().all()
    for _, run in done.iterrows():  # each cell really trained its own config
        config = json.loads((Path(run["dir"]) / "config.json").read_text())
        assert config["head"]["lambda_cal"] == float(run["lambda_cal"]) and config["seed"] == run["seed"]
        assert config["head"]["fusion"] == json.loads(run["fusion"]) and config["iterations"] == 20


def test_a_broken_cell_is_reported_and_the_others_finish(grid_run):
    _, broken, result, log = grid_run
    runs = result["runs"]
    failed = runs[runs["status"] == "failed"]
    assert len(failed) == 1 and failed.iloc[0]["dir"] == str(broken)
    assert "Is a directory" in failed.iloc[0]["error"] and "metrics.jsonl" in failed.iloc[0]["error"]
    assert any("FAILED" in line and "seed 1" in line for line in log)
    table = pd.read_csv(result["paths"]["results"], index_col=0)
    row = table.loc["lambda_cal=0.1|fusion=[0.5,0.5]"]
    assert row["runs"] == 1 and row["failed"] == 1 and np.isnan(row["H_std"])
    assert (table.drop(index=row.name)["runs"] == 2).all()
    assert "1 failed" in result["paths"]["markdown"].read_text()


def test_rerun_skips_finished_cells_and_redoes_the_failed_one(grid_run):
    root, broken, first, _ = grid_run
    stamps = {d: (root / d / "summary.json").stat().st_mtime_ns for d in first["runs"]["dir"] if d != str(broken)}
    shutil.rmtree(broken / "metrics.jsonl")
    log = []
    again = run_ablate(options(root), log=log.append)
    assert "8 cells: 7 finished before, 1 to run" in log[1]
    assert {d: (root / d / "summary.json").stat().st_mtime_ns for d in stamps} == stamps
    assert (again["runs"]["status"] == "done").all()
    history = json.loads((root / "ablation" / "ablation.json").read_text())["history"]
    assert [h["cells_run"] for h in history] == [8, 1]
    kept = again["runs"].set_index("dir").loc[list(stamps), SCORES]
    pd.testing.assert_frame_equal(kept, first["runs"].set_index("dir").loc[list(stamps), SCORES])


def _number_pairs(cell: str) -> tuple[float, float]:
    mean, std = re.fullmatch(r"\$?(-?[\d.]+)(?: (?:±|\\pm) (-?[\d.]+))?\$?", cell.strip()).groups()
    return float(mean), float(std) if std is not None else np.nan


def test_markdown_and_latex_tables_read_back_to_the_csv_numbers(grid_run):
    _, _, result, _ = grid_run
    table = pd.read_csv(result["paths"]["results"], index_col=0)
    md_rows = [ln for ln in result["paths"]["markdown"].read_text().splitlines() if ln.startswith("| ")]
    md_header = [c.strip() for c in re.split(r"(?<!\\)\|", md_rows[0])[1:-1]]
    tex = result["paths"]["latex"].read_text()
    tex_rows = [ln.removesuffix(r" \\").split(" & ") for ln in tex.splitlines() if ln.endswith(r"\\")]
    assert [c.replace(r"\_", "_") for c in tex_rows[0][3:]] == md_header[3:]
    for md, tex_row in zip(md_rows[1:], tex_rows[1:], strict=True):
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", md)[1:-1]]
        variant = cells[0].replace(r"\|", "|")
        assert tex_row[0].replace(r"\_", "_") == variant
        for metric, md_cell, tex_cell in zip(SCORES + ["train_s", "cpu_s"], cells[3:], tex_row[3:], strict=True):
            digits = 1 if metric.endswith("_s") else 2
            want = (round(table.at[variant, f"{metric}_mean"], digits), round(table.at[variant, f"{metric}_std"], digits))
            for got in (_number_pairs(md_cell), _number_pairs(tex_cell)):
                np.testing.assert_allclose(got, want, atol=1e-9)


def test_cells_of_another_config_are_refused_before_anything_runs(grid_run):
    root, _, _, _ = grid_run
    with pytest.raises(AblationError, match="another config or cache"):
        run_ablate(options(root, overrides=QUICK + ["iterations=30"]))


def test_the_cli_prints_the_table_and_exits_1_when_a_cell_failed(tmp_path):
    write_tiny_cache(tmp_path / "tiny.h5")
    (tmp_path / "ab" / "no_causal" / "seed0" / "metrics.jsonl").mkdir(parents=True)
    sets = [a for q in QUICK for a in ("--set", q)]
    done = subprocess.run(["msdn", "ablate", "--recipe", "demo", "--cache", "tiny.h5", "--out", "ab", *sets,
                           "--ablation", "no_causal", "--seeds", "0", "--workers", "1", "--device", "cpu"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 1, done.stderr
    assert "| no_causal | no causal intervention" in done.stdout and "1 cell(s) FAILED" in done.stdout
    assert "no_causal seed 0: FAILED: IsADirectoryError" in done.stderr
    assert pd.read_csv(tmp_path / "ab" / "runs.csv")["status"].tolist() == ["failed"]


def test_workers_exit_cleanly_after_the_last_cell(tmp_path):
    """A worker dies with the pool thread that started it (PR_SET_PDEATHSIG): closing the pool
    before the workers killed them and leaked their semaphores (a warning at every exit)."""
    write_tiny_cache(tmp_path / "tiny.h5")
    sets = [a for q in QUICK for a in ("--set", q)]
    done = subprocess.run(["msdn", "ablate", "--recipe", "demo", "--cache", "tiny.h5", "--out", "ab", *sets,
                           "--ablation", "full", "--seeds", "0", "--workers", "1", "--device", "cpu"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "leaked semaphore" not in done.stderr, done.stderr


def test_builtin_ablations_change_what_their_names_say():
    base = load_recipe("CUB")
    reg = builtin_ablations(base)
    cfg = {name: a.overrides for name, a in reg.items()}
    # the recipe trains plain MSDN, so "full" is the reading and weight the causal screen validated
    assert cfg["full"] == VALIDATED_CAUSAL and cfg["no_causal"] == {"lambda_causal": 0.0}
    assert VALIDATED_CAUSAL["lambda_causal"] > 0
    assert cfg["ava_only"]["subnets"] == "ava" and cfg["vaa_only"]["subnets"] == "vaa"
    assert cfg["no_distill"]["lambda_distill"] == 0.0 and cfg["no_calibration"]["lambda_cal"] == 0.0
    assert {n for n in reg if n.startswith("cf_")} == {"cf_uniform", "cf_reversed", "cf_shuffle"}  # random = full
    assert cfg["test_ava"]["fusion"] == (1.0, 0.0) and cfg["test_vaa"]["fusion"] == (0.0, 1.0)
    assert all(o.get("lambda_causal") == VALIDATED_CAUSAL["lambda_causal"] for n, o in cfg.items() if n != "no_causal")
    cells = plan_cells("CUB", "out", ablations=list(reg), seeds=[0], overrides=["lambda_causal=0.3"])
    by_name = {c.variant: c.config.head for c in cells}
    assert by_name["full"].lambda_causal == 0.3 and by_name["no_causal"].lambda_causal == 0.0
    assert by_name["cf_shuffle"].counterfactual == "shuffle" and by_name["test_vaa"].fusion == (0.0, 1.0)
    assert all(c.config.iterations == base.iterations for c in cells)


def test_grid_parsing_and_bad_input_fail_before_work(tmp_path):
    assert parse_grid(["fusion=[1,0],[0.5,0.5]", "lr= 1e-4 ,2e-4"]) == [("fusion", ["[1,0]", "[0.5,0.5]"]),
                                                                        ("lr", ["1e-4", "2e-4"])]
    with pytest.raises(AblationError, match="key=value1,value2"):
        parse_grid(["lr"])
    with pytest.raises(AblationError, match="unknown ablation"):
        plan_cells("demo", tmp_path, ablations=["no_such"])
    with pytest.raises(AblationError, match="variant 'lambda_cal=-1'.*lambda_cal"):
        plan_cells("demo", tmp_path, grid=["lambda_cal=0.1,-1"])
    with pytest.raises(AblationError, match="seeds"):
        plan_cells("demo", tmp_path, seeds=[1, 1])
    assert not any(tmp_path.iterdir())


def test_presets_plan_valid_grids(tmp_path):
    demo = plan_cells("demo", tmp_path, ablations=list(builtin_ablations(load_recipe("demo"))),
                      seeds=PRESETS["demo"].seeds, overrides=list(PRESETS["demo"].overrides))
    assert len(demo) == 36 and all(c.config.iterations == load_recipe("demo").iterations for c in demo)
    cub = plan_cells("CUB100", tmp_path, ablations=list(PRESETS["cub100"].ablations), seeds=PRESETS["cub100"].seeds)
    assert all(cell_state(c, "key") == "todo" for c in cub)


def test_a_worker_that_dies_fails_only_its_cell_and_is_replaced(tmp_path):
    write_tiny_cache(tmp_path / "tiny.h5")

    def job(name, iterations):
        (tmp_path / name).mkdir()
        return {"recipe": "demo", "overrides": QUICK + [f"iterations={iterations}", "selection=fixed"],
                "cache": str(tmp_path / "tiny.h5"), "dir": str(tmp_path / name), "device": "cpu"}

    worker = Worker({"OMP_NUM_THREADS": "1"})
    try:
        result = {}
        thread = threading.Thread(target=lambda: result.update(long=worker.run(job("long", 10**6))))
        thread.start()
        deadline = time.monotonic() + 120
        while not (tmp_path / "long" / "config.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        pid = worker.proc.pid
        os.kill(pid, signal.SIGKILL)
        thread.join(60)
        assert result["long"] == ("failed", "worker killed by signal 9 (SIGKILL)", None)
        status, error, cpu = worker.run(job("after", 10))
        assert (status, error) == ("done", "") and cpu > 0 and worker.proc.pid != pid
        assert (tmp_path / "after" / "summary.json").is_file()
    finally:
        worker.close()


def test_ctrl_c_stops_every_worker_and_exits_130(tmp_path):
    write_tiny_cache(tmp_path / "tiny.h5")
    proc = subprocess.Popen(["msdn", "ablate", "--recipe", "demo", "--cache", "tiny.h5", "--out", "ab",
                             "--ablation", "full,no_causal,ava_only", "--seeds", "0", "--set", "iterations=1000000",
                             "--set", "eval_every=500000", "--set", "batch_size=8", "--workers", "2", "--device", "cpu"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 240
        while len(list(tmp_path.glob("ab/*/seed0/config.json"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        group = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(group) >= 3  # the ablation and its two workers
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20  # multiprocessing's resource tracker leaves when its pipe closes
    while subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    assert subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split() == []
    assert sorted(p.parent.parent.name for p in tmp_path.glob("ab/*/seed0/cell.json")) == ["full", "no_causal"]
    runs = pd.read_csv(tmp_path / "ab" / "runs.csv")  # the tables of what finished (nothing yet) are written
    assert runs["status"].tolist() == ["interrupted", "interrupted", "not run"]
    assert "INTERRUPTED" in (tmp_path / "ab" / "results.tex").read_text()
