"""`msdn ablate --launcher slurm` on the real local cluster (scripts/slurm-local-cluster.sh): the
same table as the local workers, --no-wait then --status then the same command collecting, scancel
then the same command finishing only the missing cells, the refusals; and the local launcher never
imports submitit."""
import json
import os
import re
import shlex
import subprocess
import sys

import pandas as pd
import pytest

from cache.errors import UserError
from pipeline.commands.ablate import AblateOptions, ablation_status, run_ablate
from pipeline.launch import SlurmOptions
from tests.fixtures.caches import write_tiny_cache
from tests.fixtures.slurm import slurm_cluster, wait_for  # noqa: F401 - a fixture

QUICK = ["iterations=20", "eval_every=10", "log_every=10", "batch_size=8", "lr=3e-3", "eval_batch_size=16"]
SCORES = ["ZSL", "U", "S", "H", "AUSUC"]
needs_slurm = pytest.mark.usefixtures("slurm_cluster")


def msdn(*args, cwd, timeout=300):
    return subprocess.run(["msdn", "ablate", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


@needs_slurm
def test_four_cells_on_slurm_give_the_table_of_the_local_workers(tmp_path):
    write_tiny_cache(tmp_path / "tiny.h5")
    common = dict(recipe="demo", cache=str(tmp_path / "tiny.h5"), ablations=["full", "no_causal"], seeds=[0, 1],
                  overrides=QUICK, device="cpu")
    local = run_ablate(AblateOptions(out=str(tmp_path / "local"), workers=2, **common), log=lambda m: None)
    log = []
    slurm = run_ablate(AblateOptions(out=str(tmp_path / "slurm"), launcher="slurm", slurm=SlurmOptions(cpus_per_task=1),
                                     **common), log=log.append)
    assert any(re.fullmatch(r"slurm job \d+: 4 done, 0 running, 0 pending, 0 failed", line) for line in log)
    key = ["variant", "seed"]
    ours, theirs = (r["runs"].set_index(key).sort_index() for r in (slurm, local))
    assert (ours["status"] == "done").all() and len(ours) == 4
    pd.testing.assert_frame_equal(ours[SCORES], theirs[SCORES])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "slurm" / "results.csv", index_col=0)[["H_mean", "H_std"]],
                                  pd.read_csv(tmp_path / "local" / "results.csv", index_col=0)[["H_mean", "H_std"]])
    cell = json.loads((tmp_path / "slurm" / "full" / "seed0" / "cell.json").read_text())
    assert cell["slurm"]["node"] and cell["cpu_seconds"] > 0 and (tmp_path / "slurm" / "full" / "seed0" / "stderr.log").is_file()
    assert json.loads((tmp_path / "slurm" / "ablation.json").read_text())["launcher"] == "slurm"


@needs_slurm
def test_no_wait_then_status_then_the_same_command_collects(tmp_path):
    write_tiny_cache(tmp_path / "tiny.h5")
    args = ["--recipe", "demo", "--cache", "tiny.h5", "--out", "ab", "--ablation", "full", "--seeds", "0,1",
            *sets(QUICK), "--device", "cpu", "--launcher", "slurm", "--array-parallelism", "1"]
    done = msdn(*args, "--no-wait", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job = re.search(r"slurm job (\d+) submitted", done.stdout).group(1)
    assert f"collect:   msdn ablate {' '.join(args)}" in done.stdout  # the same command, without --no-wait
    status = msdn("--status", "ab", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0].startswith("ab: 2 cells: ")
    assert re.search(rf"full seed 1: (queued \(slurm {job}_1 PENDING\)|running|done)", status.stdout)
    assert re.search(rf"slurm job {job}: ", status.stdout)
    collect = msdn(*args, cwd=tmp_path)
    assert collect.returncode == 0, collect.stderr
    assert re.search(rf"slurm job {job} of an earlier invocation has [12] cell\(s\) in the queue: waiting",
                     collect.stderr) or "2 cells: 2 finished before" in collect.stderr  # (already over)
    assert "0 in an earlier array, 0 to submit" in collect.stderr
    assert "| full |" in collect.stdout and pd.read_csv(tmp_path / "ab" / "runs.csv")["status"].tolist() == ["done"] * 2
    final = msdn("--status", "ab", cwd=tmp_path).stdout
    assert "ab: 2 cells: 2 done" in final and f"slurm job {job}: no task in the queue" in final


@needs_slurm
def test_after_scancel_the_same_command_runs_only_the_missing_cells(tmp_path):
    write_tiny_cache(tmp_path / "tiny.h5")
    args = ["--recipe", "demo", "--cache", "tiny.h5", "--out", "ab", "--ablation", "full,no_causal", "--seeds", "0,1",
            *sets(QUICK + ["iterations=60", "eval_every=60"]), "--device", "cpu", "--launcher", "slurm",
            "--array-parallelism", "1"]
    job = re.search(r"slurm job (\d+) submitted", msdn(*args, "--no-wait", cwd=tmp_path).stdout).group(1)
    first = tmp_path / "ab" / "full" / "seed0"
    wait_for(lambda: (first / "summary.json").is_file(), 240, "the first cell to finish")
    subprocess.run(["scancel", job], check=True)
    wait_for(lambda: "no task in the queue" in ablation_status(tmp_path / "ab")[-1], 60, "the array to leave")
    status = msdn("--status", "ab", cwd=tmp_path).stdout
    finished = [d for d in (tmp_path / "ab").glob("*/seed*") if (d / "summary.json").is_file()]
    assert 1 <= len(finished) < 4 and f"ab: 4 cells: {len(finished)} done" in status
    assert "left the queue before the cell ended (the same command resubmits it)" in status
    stamps = {d: (d / "summary.json").stat().st_mtime_ns for d in finished}
    again = msdn(*[a for a in args if a not in ("--array-parallelism", "1")], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"4 cells: {len(finished)} finished before, 0 in an earlier array, {4 - len(finished)} to submit" in again.stderr
    assert {d: (d / "summary.json").stat().st_mtime_ns for d in finished} == stamps
    assert pd.read_csv(tmp_path / "ab" / "runs.csv")["status"].tolist() == ["done"] * 4


@needs_slurm
def test_refusals_come_before_anything_is_submitted(tmp_path):
    write_tiny_cache(tmp_path / "tiny.h5")
    slurm = dict(launcher="slurm", slurm=SlurmOptions())
    cases = [
        (dict(slurm=SlurmOptions(partition="gpu_nope"), launcher="slurm"), "--slurm-partition 'gpu_nope': Slurm knows debug"),
        (dict(cache=str(tmp_path / "missing.h5"), **slurm), "missing.h5: feature cache not found"),
        (dict(workers=2, **slurm), "--workers applies to --launcher local"),
        (dict(slurm=SlurmOptions(partition="debug")), "apply to --launcher slurm only"),
        (dict(wait=False), "--no-wait applies to --launcher slurm only"),
        (dict(cell=0, **slurm), "--cell runs one cell in this process"),
    ]
    for extra, message in cases:
        options = AblateOptions(**{**dict(out=str(tmp_path / "ab"), recipe="demo", cache=str(tmp_path / "tiny.h5"),
                                          ablations=["full"], seeds=[0], overrides=QUICK, device="cpu"), **extra})
        with pytest.raises(UserError, match=re.escape(message)):
            run_ablate(options, log=lambda m: None)
    assert not (tmp_path / "ab").exists()
    bare = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # msdn and python, but no Slurm commands
    done = subprocess.run(["msdn", "ablate", "--recipe", "demo", "--cache", "tiny.h5", "--out", "ab", "--launcher",
                           "slurm"], capture_output=True, text=True, cwd=tmp_path, env=bare, timeout=120)
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        "Error: --launcher slurm: sbatch not found on PATH (run on a machine that submits to Slurm)"]
    assert not (tmp_path / "ab").exists()


@needs_slurm
def test_a_plain_sbatch_array_of_cell_tasks_then_the_same_command_collects(tmp_path):
    """docs/slurm.md's way without submitit: `--cell $SLURM_ARRAY_TASK_ID` in an sbatch --array script."""
    write_tiny_cache(tmp_path / "tiny.h5")
    args = ["--recipe", "demo", "--cache", "tiny.h5", "--out", "ab", "--ablation", "full", "--seeds", "0,1",
            *sets(QUICK), "--device", "cpu"]
    (tmp_path / "cells.sbatch").write_text("#!/bin/bash\n#SBATCH --array=0-1\n#SBATCH --output=cell-%a.log\n"
                                           f"msdn ablate {shlex.join(args)} --cell $SLURM_ARRAY_TASK_ID\n")
    subprocess.run(["sbatch", "--wait", "--quiet", "cells.sbatch"], cwd=tmp_path, check=True, timeout=300)
    assert "(full seed 1): H " in (tmp_path / "cell-1.log").read_text()
    assert json.loads((tmp_path / "ab" / "full" / "seed1" / "cell.json").read_text())["slurm"]["task"].endswith("_1")
    collect = msdn(*args, "--workers", "1", cwd=tmp_path)
    assert collect.returncode == 0, collect.stderr
    assert "2 cells: 2 finished before, 0 to run" in collect.stderr and "| full |" in collect.stdout
    beyond = msdn(*args, "--cell", "2", cwd=tmp_path)
    assert beyond.returncode != 0 and "--cell 2: the plan has 2 cells (0-1)" in beyond.stderr


def test_the_local_launcher_never_imports_submitit(tmp_path):
    write_tiny_cache(tmp_path / "tiny.h5")
    program = (
        "import sys, cli\n"
        "from pipeline.commands.ablate import AblateOptions, run_ablate\n"
        f"run_ablate(AblateOptions(out={str(tmp_path / 'ab')!r}, recipe='demo', cache={str(tmp_path / 'tiny.h5')!r},"
        f" ablations=['full'], seeds=[0], overrides={QUICK!r}, workers=1, device='cpu'), log=lambda m: None)\n"
        "assert 'submitit' not in sys.modules, 'the local path imported submitit'\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert pd.read_csv(tmp_path / "ab" / "runs.csv")["status"].tolist() == ["done"]
    status = ablation_status(tmp_path / "ab")  # --status reads a local ablation too; no queue to ask
    assert status[0] == f"{tmp_path / 'ab'}: 1 cells: 1 done" and re.fullmatch(r"  full seed 0: done \(H [\d.]+\)",
                                                                               status[1]) and len(status) == 2
    with pytest.raises(UserError, match="not an ablation folder"):
        ablation_status(tmp_path)
