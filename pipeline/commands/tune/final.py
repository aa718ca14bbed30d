"""`msdn tune --final`: the best configuration against the recipe it started from, on the test split.

For each seed, two full `msdn train` runs (pipeline.train.train: validation run, selection, final
run on trainval, the test split evaluated once): best.toml's configuration and the recipe after
--set, both with that seed. They land in <out>/final/{tuned,recipe}-seed<S>/ (a folder that holds
a finished run of the same configuration is not trained again), and the paired differences in final/paired.json and
final/paired.md.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Callable

from pipeline.config import TrainConfig
from pipeline.runlog import write_json_atomic
from pipeline.train import train

METRICS = ("ZSL", "U", "S", "H", "AUSUC")


def run_final(tuned: TrainConfig, recipe: TrainConfig, cache: str, out_dir: Path, seeds: list[int], *,
              device: str = "auto", max_memory: str | None = None, log: Callable[[str], None] = print,
              tuned_from: dict | None = None) -> dict:
    """tuned_from: which trial `tuned` is (kept in paired.json)."""
    folder = out_dir / "final"
    runs = {}
    for seed in seeds:
        for name, config in (("tuned", tuned), ("recipe", recipe)):
            run_dir, config = folder / f"{name}-seed{seed}", replace(config, seed=seed)
            if _finished_with(run_dir, config):
                summary = json.loads((run_dir / "summary.json").read_text())
            else:
                log(f"final: {name}, seed {seed} -> {run_dir}")
                summary = train(config, cache, run_dir, device=device, progress=False,
                                overwrite=True, max_memory=max_memory, log=lambda _msg: None)
            runs[(name, seed)] = {m: summary["test"][m] for m in METRICS} | {
                "cpu_seconds": summary["timing"]["final_train_cpu_seconds"]}
    paired = {**paired_table(runs, seeds), "tuned": tuned_from or {}}
    write_json_atomic(folder / "paired.json", paired)
    (folder / "paired.md").write_text(paired_markdown(paired))
    return paired


def _finished_with(run_dir: Path, config: TrainConfig) -> bool:
    """The folder holds a finished run of exactly this configuration (a newer best trial, or other
    --set values, train again)."""
    if not (run_dir / "summary.json").exists():
        return False
    stored = json.loads((run_dir / "config.json").read_text())
    for key in ("run", "environment"):  # what ran it, not what it is
        stored.pop(key, None)
    return stored == json.loads(json.dumps(config.to_dict()))


def paired_table(runs: dict, seeds: list[int]) -> dict:
    """Per seed both runs' test scores and their difference; mean (± sample std) of each, and in
    how many seeds the tuned configuration is ahead."""
    rows = [{"seed": s, "tuned": runs[("tuned", s)], "recipe": runs[("recipe", s)],
             "delta": {m: runs[("tuned", s)][m] - runs[("recipe", s)][m] for m in METRICS}} for s in seeds]
    summary = {}
    for part in ("tuned", "recipe", "delta"):
        summary[part] = {m: _mean_std([r[part][m] for r in rows]) for m in METRICS}
    summary["tuned_ahead"] = {m: sum(r["delta"][m] > 0 for r in rows) for m in METRICS}
    return {"seeds": seeds, "rows": rows, "summary": summary}


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def paired_markdown(paired: dict) -> str:
    head = "| seed | run | " + " | ".join(METRICS) + " |\n|---|---|" + "---|" * len(METRICS) + "\n"
    lines = []
    for r in paired["rows"]:
        for part in ("tuned", "recipe", "delta"):
            values = " | ".join(f"{100 * r[part][m]:+.2f}" if part == "delta" else f"{100 * r[part][m]:.2f}"
                                for m in METRICS)
            lines.append(f"| {r['seed']} | {part} | {values} |")
    s, n = paired["summary"], len(paired["rows"])
    for part in ("tuned", "recipe", "delta"):
        values = " | ".join(f"{100 * s[part][m]['mean']:.2f} ± {100 * s[part][m]['std']:.2f}" for m in METRICS)
        lines.append(f"| mean ± std | {part} | {values} |")
    ahead = " | ".join(f"{s['tuned_ahead'][m]}/{n}" for m in METRICS)
    lines.append(f"| seeds | tuned ahead | {ahead} |")
    return ("Test split, once per run (selection on validation, as `msdn train`); scores in %.\n\n"
            + head + "\n".join(lines) + "\n")
