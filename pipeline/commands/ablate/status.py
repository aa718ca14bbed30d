"""`msdn ablate --status DIR`: where each cell of an ablation stands, read from its folder.

The disk says done / failed (with its one-line reason) / running / queued / interrupted / not
started: plan.json lists every planned cell (written before any runs), each cell's cell.json says
how far it got. For cells submitted to Slurm (slurm/arrays.json) the queue adds what the disk cannot
know: whether a "queued" or "running" cell is still in the queue (PENDING, RUNNING on which node) or
has left it without finishing (cancelled, killed: the same command resubmits it). Where Slurm cannot
be asked, that is said and the disk's word stands.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from pipeline.commands.ablate.grid import AblationError, Cell
from pipeline.commands.ablate.record import CELL_FILE, read_json
from pipeline.commands.ablate.slurm_cells import read_arrays
from pipeline.runlog import write_json_atomic

PLAN = "plan.json"


def write_plan(cells: list[Cell], out: Path) -> None:
    """plan.json: every cell in plan order (--cell N's N). Several `--cell` tasks may write it at
    once, so each through a temporary file of its own."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"cells": [{"dir": str(c.dir.resolve().relative_to(out.resolve())), "variant": c.variant, "seed": c.seed}
                      for c in cells]}
    os.replace(write_json_atomic(out / f".{PLAN}.{os.getpid()}", plan), out / PLAN)


def ablation_status(out: str | Path) -> list[str]:
    """One line per cell, then the counts, then the Slurm queue's word (when cells went to Slurm)."""
    out = Path(out)
    plan = read_json(out / PLAN)
    if plan is None:
        raise AblationError(f"{out}: not an ablation folder (no {PLAN}; `msdn ablate --out {out}` writes it)")
    where = {}  # cell folder -> (job id, task id) of the latest array that held it
    for array in read_arrays(out):
        where.update({name: (array["job_id"], task) for name, task in zip(array["cells"], array["tasks"])})
    queue = _queues({job for job, _ in where.values()})
    lines, seen = [], Counter()
    for cell in plan["cells"]:
        state, detail = _cell_state(out / cell["dir"], where.get(cell["dir"]), queue)
        seen[state] += 1
        lines.append(f"  {cell['variant']} seed {cell['seed']}: {state}{detail}")
    head = f"{out}: {len(plan['cells'])} cells: " + ", ".join(f"{n} {s}" for s, n in seen.items())
    tail = []
    for job, states in sorted(queue.items()):
        if states is None:
            tail.append(f"slurm job {job}: Slurm not reachable here (squeue), queue state unknown")
        else:
            tail.append(f"slurm job {job}: " + (", ".join(f"{n} {s}" for s, n in Counter(states.values()).items())
                                                or "no task in the queue"))
    return [head, *lines, *tail]


def _queues(jobs: set[str]) -> dict[str, dict | None]:
    if not jobs:
        return {}
    from pipeline.launch.slurm import queue_state  # only for an ablation that went to Slurm

    return {job: queue_state(job) for job in jobs}


def _cell_state(cell_dir: Path, task: tuple[str, str] | None, queue: dict) -> tuple[str, str]:
    meta = read_json(cell_dir / CELL_FILE)
    if meta is None:
        return "not started", ""
    status = meta.get("status", "unknown")
    if status == "done" and (cell_dir / "summary.json").is_file():
        summary = read_json(cell_dir / "summary.json") or {}
        return "done", f" (H {100 * summary.get('test', {}).get('H', float('nan')):.2f})"
    if status == "failed":
        return "failed", f": {meta.get('error', 'no reason recorded')}"
    if status in ("queued", "running") and task is not None:
        job, task_id = task
        states = queue.get(job)
        if states is None:
            return status, f" (slurm {task_id}; queue state unknown)"
        if task_id in states:
            node = meta.get("slurm", {}).get("node") if status == "running" else None
            return status, f" (slurm {task_id} {states[task_id]}" + (f" on {node})" if node else ")")
        return "stopped", (f": slurm task {task_id} left the queue before the cell ended "
                           "(the same command resubmits it)")
    return status, ""
