"""`msdn ablate --launcher slurm`: the cells that are not finished as ONE Slurm job array.

Submitting side (submit_cells): every unfinished cell gets a cell.json saying "queued" and becomes
one task of the array (pipeline/launch/slurm.py); <out>/slurm/ holds submitit's job folder and
arrays.json, the arrays this ablation submitted (job id, cell folders in array-index order), which
`--status` and the next invocation read. An array of an earlier invocation that still has tasks in
the queue is waited for first (that is how the same command collects after --no-wait), and its
cells are never submitted twice.

Node side (run_cell): exactly what a local worker does for a cell (grid._run_cell with
workers.train_cell): cell.json "running", the training with its output in stderr.log, then cell.json
with timing and done / failed and its one-line reason. A failed cell also fails its Slurm task.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from cache.errors import UserError
from pipeline.commands.ablate.grid import Cell, cell_record, cells_to_run
from pipeline.commands.ablate.record import CELL_FILE, end_cell, read_json, start_record
from pipeline.commands.ablate.workers import train_cell
from pipeline.launch import Task
from pipeline.runlog import write_json_atomic

TARGET = "pipeline.commands.ablate.slurm_cells:run_cell"
FOLDER = "slurm"
ARRAYS = "arrays.json"


class CellFailed(UserError, RuntimeError):
    """A cell that failed on its node (its reason is in cell.json); fails the Slurm task too."""


def run_cell(job: dict, meta: dict) -> str:
    """One array task: the cell `job` describes (recipe, overrides, cache, dir, device)."""
    threads = os.environ.get("SLURM_CPUS_PER_TASK")
    if threads:  # as a local worker's share of the cores, before torch starts its thread pool
        os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        import torch
        torch.set_num_threads(int(threads))
    env = os.environ  # an array of one cell is a plain job (submitit's choice): no array ids
    task = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_JOB_ID" in env else env.get("SLURM_JOB_ID")
    cell_dir = Path(job["dir"])
    meta = {**meta, "status": "running", "slurm": {"task": task, "node": socket.gethostname()}}
    start_record(cell_dir, meta)
    start = time.perf_counter()
    status, error, cpu = train_cell(job)
    text = end_cell(cell_dir, meta, status, error, cpu, time.perf_counter() - start)
    if meta["status"] != "done":
        raise CellFailed(f"{meta['variant']} seed {meta['seed']}: {text}")
    return text


def read_arrays(out: Path) -> list[dict]:
    return (read_json(Path(out) / FOLDER / ARRAYS) or {}).get("arrays", [])


def submit_cells(cells: list[Cell], cache: Path, launcher, *, recipe: str, cache_info: dict, out: Path,
                 device: str, overwrite: bool, wait: bool, log=print) -> tuple[str | None, int]:
    """`launcher`: a checked SlurmLauncher whose folder is <out>/slurm. Wait for this ablation's
    arrays still in the queue (when `wait`), then submit the unfinished cells as one array; when
    `wait`, block until its last task ends, one progress line per change.
    Returns the new array's job id (None: nothing left to run) and its number of cells."""
    out = Path(out).resolve()
    queued = _still_queued(out, launcher, wait, log)
    todo = [c for c in cells_to_run(cells, cache_info["content_key"], overwrite) if _name(c, out) not in queued]
    log(f"{len(cells)} cells: {len(cells) - len(todo) - len(queued)} finished before, "
        f"{len(queued)} in an earlier array, {len(todo)} to submit")
    if not todo:
        return None, 0
    tasks = []
    for cell in todo:
        meta = cell_record(cell, cache, recipe, cache_info, device, "queued")
        start_record(cell.dir, meta)
        tasks.append(Task(_name(cell, out), TARGET, {"job": {"recipe": recipe, "overrides": cell.overrides,
                                                             "cache": str(cache), "dir": str(cell.dir),
                                                             "device": device}, "meta": meta}))
    launch = launcher.launch(tasks)
    arrays = read_arrays(out) + [{"job_id": launch.job_id, "cells": launch.names, "tasks": launch.task_ids,
                                  "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
    write_json_atomic(out / FOLDER / ARRAYS, {"arrays": arrays})
    log(f"submitted slurm job {launch.job_id}: {len(tasks)} cell(s) as one array (job folder {out / FOLDER})")
    if wait:
        _wait(launch, out, log)
    return launch.job_id, len(todo)


def _name(cell: Cell, out: Path) -> str:
    return str(cell.dir.resolve().relative_to(out))


def _still_queued(out: Path, launcher, wait: bool, log) -> set[str]:
    """Cells of earlier arrays still in the queue: waited for (then none is left) or, under
    --no-wait, left out of the new array."""
    queued = set()
    for array in read_arrays(out):
        launch = launcher.attach(array["job_id"])
        states = launch.states()
        left = [n for n, s in states.items() if s in ("pending", "running")]
        if left and wait:
            log(f"slurm job {launch.job_id} of an earlier invocation has {len(left)} cell(s) in the queue: waiting")
            _wait(launch, out, log)
        elif left:
            queued.update(left)
    return queued


def _wait(launch, out: Path, log) -> None:
    def progress(now: dict) -> None:
        log(f"slurm job {launch.job_id}: {now['done']} done, {now['running']} running, "
            f"{now['pending']} pending, {now['failed']} failed")

    try:
        states = launch.wait(on_change=progress)
    except KeyboardInterrupt:
        log(f"stopped waiting; slurm job {launch.job_id} keeps running (scancel {launch.job_id} stops it; "
            f"msdn ablate --status {out} shows it; the same command again collects)")
        raise
    for index, (name, state) in enumerate(states.items()):
        meta = read_json(out / name / CELL_FILE) or {}
        if state == "failed" and meta.get("status") in ("queued", "running"):  # ended before the cell could say
            end_cell(out / name, meta, "failed", f"slurm task {launch.task_ids[index]} ended before the cell did "
                     f"(cancelled, preempted past its requeues, or killed; {launch.task_log(index)})", None, 0.0)

