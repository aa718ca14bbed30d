"""A cell's cell.json while it runs and when it ends: the same bookkeeping on a local worker
(grid.run_cells) and on a Slurm node (slurm_cells.run_cell), so a cell's folder reads the same
whichever launcher ran it."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.runlog import write_json_atomic

CELL_FILE = "cell.json"


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def start_record(cell_dir: Path, meta: dict) -> None:
    """A cell starts: cell.json says "running" and an earlier summary.json goes (it would mark the
    cell finished). The same on a local worker and on a Slurm node."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cell_dir / CELL_FILE, meta)
    (cell_dir / "summary.json").unlink(missing_ok=True)


def end_cell(cell_dir: Path, meta: dict, status: str, error: str, cpu: float | None, wall: float, *,
             interrupted: bool = False) -> str:
    """Record how a cell ended in cell.json (wall and CPU seconds, done / failed with its one-line
    error / interrupted) and return the progress text ("H 45.20 (12 s, 11 s CPU)", "FAILED: ...")."""
    meta["wall_seconds"], meta["cpu_seconds"] = wall, cpu
    if status == "done" and (cell_dir / "summary.json").is_file():
        meta["status"] = "done"
        summary = json.loads((cell_dir / "summary.json").read_text())
        text = f"H {100 * summary['test']['H']:.2f} ({wall:.0f} s, {cpu:.0f} s CPU)"
    elif interrupted:  # Ctrl-C: not the cell's fault; the next run redoes it
        meta["status"], text = "interrupted", "interrupted"
    else:
        meta["status"], meta["error"] = "failed", error or "no summary.json written"
        text = f"FAILED: {meta['error']}"
    write_json_atomic(cell_dir / CELL_FILE, meta)
    return text
