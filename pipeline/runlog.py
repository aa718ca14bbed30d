"""The run folder every `msdn train` / `msdn evaluate` writes: config.json, metrics.jsonl (one
JSON line per evaluation), summary.json, plus the checkpoints. JSON files are replaced atomically.
config.json also records what produced the run (its "environment": versions, platform, git commit;
pipeline/provenance.py)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cache.errors import UserError
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
    def __init__(self, out_dir: str | Path, *, overwrite: bool = False):
        self.dir = Path(out_dir)
        if (self.dir / "config.json").exists() and not overwrite:
            raise RunFolderError(f"{self.dir}: already holds a run (config.json); choose another --out "
                                 "or pass --overwrite")
        self.dir.mkdir(parents=True, exist_ok=True)
        # a run that fails must not leave an earlier run's result beside its own config.json
        (self.dir / "summary.json").unlink(missing_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.metrics_path.write_text("")

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
