"""What `msdn ablate --launcher slurm` costs over the local workers, on the same cells and machine.

    scripts/slurm-local-cluster.sh start && eval "$(scripts/slurm-local-cluster.sh env)"
    python bench/slurm_overhead.py --out runs/slurm_overhead [--ablations all] [--rounds 1]

Extracts the demo preset's cache once (<out>/cache), then runs the same cells (the demo recipe,
`--ablations` x seeds 0,1,2; all 12 ablations = the demo preset's 36 cells) with `--launcher local`
(one worker per core share, as `msdn ablate` picks) and `--launcher slurm` (--cpus-per-task 1: as
many tasks at once as the node has CPUs), back to back, `--rounds` times alternating. Per run: wall
time, the cells' own wall time (training in the worker or task), and the overhead per cell:
wall x slots / cells minus the mean cell time, i.e. what each cell costs beyond its training
(process start and imports for a Slurm task, scheduling, the 5 s polling of the wait). Writes
overhead.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.commands.ablate import AblateOptions, run_ablate  # noqa: E402
from pipeline.commands.ablate.grid import builtin_ablations  # noqa: E402
from pipeline.commands.demo import DEMO_BACKBONE, DEMO_IMAGE_SIZE  # noqa: E402
from pipeline.commands.extract import ExtractOptions, run_extract  # noqa: E402
from pipeline.config import load_recipe  # noqa: E402
from pipeline.launch import SlurmOptions  # noqa: E402


def run_once(launcher: str, out: Path, cache: Path, ablations: list[str]) -> dict:
    stamps = []
    options = AblateOptions(out=str(out), recipe="demo", cache=str(cache), ablations=ablations, seeds=[0, 1, 2],
                            device="cpu", launcher=launcher,
                            slurm=SlurmOptions(cpus_per_task=1) if launcher == "slurm" else None)
    start = time.perf_counter()
    result = run_ablate(options, log=lambda m: stamps.append((time.perf_counter() - start, m)))
    wall = time.perf_counter() - start
    runs = result["runs"]
    cells = len(runs)
    slots = os.cpu_count() if launcher == "slurm" else json.loads((out / "ablation.json").read_text())["workers"]
    submitted = next((t for t, m in stamps if m.startswith("submitted slurm job")), None)
    planned = next((t for t, m in stamps if "to submit" in m or "to run on" in m), 0.0)
    in_task = _in_task_overhead(out) if launcher == "slurm" else None
    return {"launcher": launcher, "cells": cells, "failed": int((runs["status"] != "done").sum()), "slots": slots,
            "wall_s": wall, "cell_wall_mean_s": float(runs["wall_s"].mean()), "cell_cpu_sum_s": float(runs["cpu_s"].sum()),
            "submit_s": None if submitted is None else submitted - planned,
            "overhead_per_cell_s": wall * slots / cells - float(runs["wall_s"].mean()), "in_task_overhead_s": in_task}


def _in_task_overhead(out: Path) -> float:
    """Mean seconds a Slurm task spends beyond its cell's training, from submitit's first log line
    (the interpreter and submitit already started) to its result file (unpickling the call, the
    imports of torch and the pipeline, writing the result)."""
    array = json.loads((out / "slurm" / "arrays.json").read_text())["arrays"][-1]
    extra = []
    for name, task in zip(array["cells"], array["tasks"]):
        first = (out / "slurm" / f"{task}_0_log.out").read_text().splitlines()[0]
        stamp = re.search(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\)", first).group(1)
        started = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        ended = (out / "slurm" / f"{task}_0_result.pkl").stat().st_mtime
        extra.append(ended - started - json.loads((out / name / "cell.json").read_text())["wall_seconds"])
    return sum(extra) / len(extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--ablations", default="all", help="comma-separated, or 'all' (36 cells with 3 seeds)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--slurm-first", action="store_true", help="each round: slurm, then local")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    cache = run_extract(ExtractOptions(dataset="demo", out=str(out / "cache" / "demo.h5"), backbone=DEMO_BACKBONE,
                                       image_size=DEMO_IMAGE_SIZE, device="cpu", progress=False, resume=True,
                                       data_root=str(out / "cache" / "data")), log=lambda m: None)
    every = list(builtin_ablations(load_recipe("demo")))
    ablations = every if args.ablations == "all" else args.ablations.split(",")
    results = []
    for round_ in range(args.rounds):
        for launcher in ("slurm", "local") if args.slurm_first else ("local", "slurm"):
            results.append({"round": round_, **run_once(launcher, out / f"round{round_}_{launcher}", cache, ablations)})
            print(json.dumps(results[-1]), flush=True)
    (out / "overhead.json").write_text(json.dumps({"load_before": os.getloadavg(), "runs": results}, indent=2))
    print("| round | launcher | cells | slots | wall s | cells' CPU s | mean cell s | overhead per cell s "
          "| of it inside the task s | submission s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        submit = "-" if r["submit_s"] is None else f"{r['submit_s']:.2f}"
        inside = "-" if r["in_task_overhead_s"] is None else f"{r['in_task_overhead_s']:.1f}"
        print(f"| {r['round']} | {r['launcher']} | {r['cells']} | {r['slots']} | {r['wall_s']:.0f} | "
              f"{r['cell_cpu_sum_s']:.0f} | {r['cell_wall_mean_s']:.1f} | {r['overhead_per_cell_s']:.1f} | {inside} | "
              f"{submit} |")


if __name__ == "__main__":
    main()
