"""The run folder every `msdn train` / `msdn evaluate` writes: config.json, metrics.jsonl (one
JSON line per evaluation), summary.json, plus the checkpoints. JSON files are replaced atomically.
config.json also records what produced the run (its "environment": versions, platform, git commit;
pipeline/provenance.py)."""
from __future__ import annotations

import json
import math
import os
import weakref
from pathlib import Path

import numpy as np
import pandas as pd

from cache.errors import UserError
from cache.locks import BUSY, try_lock
from pipeline.metrics import SCORES_AND_GAMMA


class RunFolderError(UserError, ValueError):
    """The output folder already holds a run (refused so that nothing already done is lost)."""


def to_jsonable(obj):
    """Plain Python (numpy scalars/arrays, tuples, Paths -> JSON types; NaN/inf -> None)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json_atomic(path: Path, obj) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(obj), indent=2) + "\n")
    os.replace(tmp, path)
    return path


class RunLog:
    """A run folder, held by this process (flock on the folder itself, released when the RunLog is
    gone or the process ends, however it ends) so that a second command writing the same --out is
    refused in one line instead of interleaving its files with the first's."""

    def __init__(self, out_dir: str | Path, *, overwrite: bool = False):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._hold()  # first: a run in progress is "being written", not "unfinished"
        if (self.dir / "config.json").exists() and not overwrite:
            finished = (self.dir / "summary.json").exists()
            raise RunFolderError(f"{self.dir}: already holds a" + (" run (config.json)" if finished else
                                 "n unfinished run (config.json, no summary.json: stopped, killed or failed)")
                                 + "; choose another --out or pass --overwrite" + ("" if finished else " to start again"))
        # a run that fails must not leave an earlier run's result beside its own config.json
        (self.dir / "summary.json").unlink(missing_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.metrics_path.write_text("")

    def _hold(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        why = try_lock(fd)
        if why == BUSY:
            raise RunFolderError(f"{self.dir}: another process is writing a run into it; wait for it to finish or "
                                 "choose another --out")
        if why is None:  # held until this RunLog is gone; else no locks on this filesystem: as before
            weakref.finalize(self, os.close, fd)

    def write_config(self, config: dict) -> Path:
        """config.json: the run's settings plus "environment" (pipeline/provenance.py)."""
        from pipeline.provenance import environment
        return write_json_atomic(self.dir / "config.json", {**config, "environment": environment()})

    def log(self, record: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(to_jsonable(record)) + "\n")

    def write_summary(self, summary: dict) -> Path:
        return write_json_atomic(self.dir / "summary.json", summary)


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def results_table(results: dict[str, dict]) -> pd.DataFrame:
    """One row per named result; accuracies and AUSUC in percent, gamma as is."""
    rows = {}
    for name, r in results.items():
        rows[name] = {c: (r.get(c) if c == "gamma" else None if r.get(c) is None else 100 * r[c])
                      for c in SCORES_AND_GAMMA}
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(SCORES_AND_GAMMA))


def format_table(results: dict[str, dict]) -> str:
    return results_table(results).to_string(float_format=lambda x: f"{x:.2f}", na_rep="-")
