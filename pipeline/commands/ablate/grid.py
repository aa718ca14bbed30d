"""`msdn ablate`: variants x seeds, each cell one `msdn train` run, gathered into a DataFrame.

Variants are built-in named ablations of MSDN++ (builtin_ablations), the cartesian product of `--grid
key=v1,v2` values, or both crossed. Each cell is a `msdn train` run folder plus `cell.json`
(its variant, seed, resolved config, the cache's content key and the equivalent `msdn train`
command line, so any row can be reproduced by hand). Cells run in spawned worker processes
(pipeline/commands/ablate/workers.py), one per GPU or per share of the CPU cores: a cell that fails or dies
takes down only itself. A cell holding summary.json made from the same config and cache is
finished: re-running the grid skips it. Presets and the whole job: pipeline/commands/ablate/__init__.py.
"""
from __future__ import annotations

import itertools
import json
import os
import queue
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from cache.errors import UserError
from pipeline.commands.ablate.record import CELL_FILE, end_cell, read_json, start_record
from pipeline.commands.ablate.workers import Worker
from pipeline.config import ConfigError, TrainConfig, apply_overrides, load_recipe
from pipeline.metrics import SCORES
from pipeline.runlog import to_jsonable

# The causal setting of the "full" model when the recipe trains plain MSDN (lambda_causal = 0): the
# reading and weight that the CUB-100 causal screen chose on validation (results/causal/cub100_224,
# docs/results.md, "Does the causal attention help?"), not a fixed CAL weight.
VALIDATED_CAUSAL = {"lambda_causal": 0.3, "causal_level": "attribute"}
SCORE_COLUMNS = SCORES  # percent in runs.csv
RUN_COLUMNS = ("variant", "seed", "status", *SCORE_COLUMNS, "gamma", "iteration", "val_H", "val_ZSL", "train_s",
               "wall_s", "cpu_s", "error", "dir")


class AblationError(UserError, ValueError):
    """A bad grid, an unknown ablation name, or an output folder holding other runs."""


@dataclass(frozen=True)
class Ablation:
    description: str
    overrides: dict  # config key -> typed value, applied on top of the recipe and --set


def builtin_ablations(base: TrainConfig) -> dict[str, Ablation]:
    """Named ablations of MSDN++ relative to `base`. All but `no_causal` train with a causal term:
    base's own (its lambda_causal and switches) or, when base has none, VALIDATED_CAUSAL."""
    causal = {"lambda_causal": base.head.lambda_causal} if base.head.lambda_causal > 0 else dict(VALIDATED_CAUSAL)
    head = replace(base.head, **causal)
    w1, w2 = base.head.fusion
    out = {
        "full": Ablation(f"MSDN++: both sub-nets, distillation, self-calibration, causal "
                         f"({head.causal_level} level, weight {head.lambda_causal:g}, {head.counterfactual} "
                         f"counterfactual), fusion {w1:g}/{w2:g}", causal),
        "ava_only": Ablation("attribute→visual sub-net only", {**causal, "subnets": "ava"}),
        "vaa_only": Ablation("visual→attribute sub-net only", {**causal, "subnets": "vaa"}),
        "no_distill": Ablation("no semantic distillation (lambda_distill = 0)", {**causal, "lambda_distill": 0.0}),
        "no_causal": Ablation("no causal intervention (lambda_causal = 0): MSDN", {"lambda_causal": 0.0}),
        "no_calibration": Ablation("no self-calibration (lambda_cal = 0)", {**causal, "lambda_cal": 0.0}),
    }
    for kind in ("random", "uniform", "reversed", "shuffle"):
        if kind != base.head.counterfactual:  # the full model already uses the base's type
            out[f"cf_{kind}"] = Ablation(f"{kind} counterfactual attention", {**causal, "counterfactual": kind})
    for name, fusion, what in (("test_ava", (1.0, 0.0), "AVA scores only"), ("test_vaa", (0.0, 1.0), "VAA scores only"),
                               ("test_equal", (0.5, 0.5), "equal weights")):
        out[name] = Ablation(f"fusion {fusion[0]:g}/{fusion[1]:g} at test time: {what}", {**causal, "fusion": fusion})
    return out


def parse_grid(items) -> list[tuple[str, list[str]]]:
    """["key=v1,v2", ...] -> [(key, ["v1", "v2"]), ...]; commas inside [...] stay in one value,
    so `fusion=[1,0],[0.5,0.5]` gives two fusions."""
    grid = []
    for item in items:
        key, sep, text = item.partition("=")
        values = [v.strip() for v in re.split(r",(?![^\[]*\])", text)] if sep else []
        if not key.strip() or not values or not all(values):
            raise AblationError(f"--grid expects key=value1,value2,..., got {item!r}")
        grid.append((key.strip(), values))
    return grid


def format_value(value) -> str:
    """A typed override value as a `--set key=value` literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


@dataclass
class Cell:
    variant: str
    seed: int
    description: str
    factors: dict           # ablation name and grid values, as table columns
    overrides: list[str]    # "key=value", in order: --set, ablation, grid, seed
    config: TrainConfig
    dir: Path


def plan_cells(recipe: str, out_dir: str | Path, *, ablations=(), grid=(), seeds=(0,), overrides=(),
               registry: dict[str, Ablation] | None = None) -> list[Cell]:
    """Every (variant, seed) cell, each config resolved now: a bad key or value is an error before
    any cell runs. No ablations and no grid: one variant, the recipe itself ("base").
    `registry`: the named ablations to draw from (default: builtin_ablations of the recipe)."""
    base = apply_overrides(load_recipe(recipe), list(overrides))
    registry = builtin_ablations(base) if registry is None else registry
    unknown = [a for a in ablations if a not in registry]
    if unknown:
        raise AblationError(f"unknown ablation(s) {unknown}; built-in: {', '.join(registry)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise AblationError(f"seeds must be distinct and at least one, got {list(seeds)}")
    grid = parse_grid(grid) if grid and isinstance(grid[0], str) else list(grid)
    keys = [k for k, _ in grid]
    if len(set(keys)) != len(keys):
        raise AblationError(f"--grid names a key twice: {keys}")
    cells = []
    for name in list(ablations) or [None]:
        named = registry[name] if name else Ablation("the recipe as given", {})
        for values in itertools.product(*[v for _, v in grid]):
            assigned = [f"{k}={v}" for k, v in zip(keys, values)]
            variant = "|".join(([name] if name else []) + assigned) or "base"
            variant_overrides = ([f"{k}={format_value(v)}" for k, v in named.overrides.items()] + assigned)
            factors = {"ablation": name or "", **dict(zip(keys, values))}
            for seed in seeds:
                cell_overrides = list(overrides) + variant_overrides + [f"seed={seed}"]
                try:
                    config = apply_overrides(load_recipe(recipe), cell_overrides)
                except ConfigError as err:
                    raise AblationError(f"variant {variant!r}: {err}") from None
                cells.append(Cell(variant, int(seed), named.description if not assigned else
                                  "; ".join(filter(None, [named.description if name else "", ", ".join(assigned)])),
                                  factors, cell_overrides, config, Path(out_dir) / _folder(variant) / f"seed{seed}"))
    return cells


def _folder(variant: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", variant.replace("|", "__"))


# ----------------------------------------------------------------------------- state of a cell
def _normalised(config: TrainConfig) -> dict:
    return json.loads(json.dumps(to_jsonable(config.to_dict())))


def cell_state(cell: Cell, content_key: str | None) -> str:
    """"finished" (same config and cache), "conflict" (the folder holds another run) or "todo"."""
    meta = read_json(cell.dir / CELL_FILE)
    ours = meta is not None and meta.get("config") == _normalised(cell.config) and meta.get("content_key") == content_key
    if (cell.dir / "summary.json").is_file():
        return "finished" if ours else "conflict"
    if (cell.dir / "config.json").is_file() and meta is None:
        return "conflict"  # a run folder that no ablation made
    return "todo"


# ----------------------------------------------------------------------------- running
def worker_slots(device: str = "auto", workers: int | None = None) -> list[dict]:
    """One {"device", "env"} per worker: a GPU each on CUDA (CUDA_VISIBLE_DEVICES), else an even
    share of the CPU cores as OpenMP threads (several 1-thread workers beat one wide one here:
    the per-step work is small)."""
    import torch

    from extract.devices import resolve_device

    if workers is not None and workers < 1:
        raise AblationError(f"--workers must be at least 1, got {workers}")
    dev = resolve_device(device)
    if dev.type == "cuda":
        gpus = [str(dev.index)] if dev.index is not None else [str(i) for i in range(torch.cuda.device_count())]
        n = workers or len(gpus)
        return [{"device": "cuda", "env": {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}} for i in range(n)]
    cores = os.cpu_count() or 1
    n = workers or min(cores, 4)
    threads = str(max(1, cores // n))
    return [{"device": str(dev), "env": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}} for _ in range(n)]


def train_command(cell: Cell, recipe: str, cache: Path, device: str) -> list[str]:
    """The `msdn train` command line equivalent to a cell (recorded in cell.json, to redo one by hand)."""
    sets = [arg for o in cell.overrides for arg in ("--set", o)]
    return [sys.executable, "-m", "cli", "train", "--recipe", recipe, "--cache", str(cache), "--out", str(cell.dir),
            *sets, "--device", device, "--quiet", "--overwrite"]


def absolute_recipe(recipe: str) -> str:
    """A recipe file as an absolute path (a cell must not depend on the shell's folder); names stay."""
    return str(Path(recipe).resolve()) if recipe.endswith(".toml") else recipe


def cells_to_run(cells: list[Cell], content_key: str, overwrite: bool) -> list[Cell]:
    """The cells that are not finished; a folder holding another run is an error unless `overwrite`."""
    states = {id(c): cell_state(c, content_key) for c in cells}
    conflicts = [c for c in cells if states[id(c)] == "conflict"]
    if conflicts and not overwrite:
        raise AblationError(f"{conflicts[0].dir}: holds a run of another config or cache ({len(conflicts)} cell(s) "
                            "like it); use another --out, or --overwrite to redo them")
    return [c for c in cells if states[id(c)] != "finished"]


def run_cells(cells: list[Cell], cache: str | Path, *, recipe: str, cache_info: dict, slots: list[dict],
              overwrite: bool = False, log=print) -> pd.DataFrame:
    """Run every unfinished cell (len(slots) at a time), then return the runs frame (collect_runs).
    `cache_info`: {"content_key", ...} describing the cache, recorded in every cell.json."""
    cache, recipe = Path(cache).resolve(), absolute_recipe(recipe)
    todo = cells_to_run(cells, cache_info["content_key"], overwrite)
    log(f"{len(cells)} cells: {len(cells) - len(todo)} finished before, {len(todo)} to run on {len(slots)} worker(s)")
    workers = [(slot, Worker(slot["env"])) for slot in slots]
    free, done, stopping, lock = queue.Queue(), [], threading.Event(), threading.Lock()
    for worker in workers:
        free.put(worker)

    def run_one(cell: Cell) -> None:
        slot, worker = free.get()
        try:
            if stopping.is_set():
                return
            status = _run_cell(cell, cache, recipe, cache_info, slot["device"], worker, stopping)
        finally:
            free.put((slot, worker))
        if stopping.is_set():
            return
        with lock:
            done.append(cell)
            log(f"[{len(done)}/{len(todo)}] {cell.variant} seed {cell.seed}: {status}")

    pool = ThreadPoolExecutor(max_workers=len(workers))
    try:
        for future in [pool.submit(run_one, c) for c in todo]:
            future.result()
    except BaseException:  # Ctrl-C: no new cell starts, running ones stop; re-running resumes
        stopping.set()
        pool.shutdown(wait=False, cancel_futures=True)
        for _, worker in workers:
            worker.kill()
        pool.shutdown()  # each pool thread sees its worker die and returns
        for _, worker in workers:
            worker.close()
        raise
    # Workers before the pool: each worker dies with the pool thread that started it
    # (PR_SET_PDEATHSIG), and a worker killed that way leaks its semaphores instead of exiting.
    for _, worker in workers:
        worker.close()
    pool.shutdown()
    runs = collect_runs(cells)
    runs.attrs["cells_run"] = len(todo)  # this invocation's share; the rest were finished before
    return runs


def _run_cell(cell: Cell, cache: Path, recipe: str, cache_info: dict, device: str, worker: Worker,
              stopping: threading.Event) -> str:
    meta = begin_cell(cell, cache, recipe, cache_info, device)
    start = time.perf_counter()
    status, error, cpu = worker.run({"recipe": recipe, "overrides": cell.overrides, "cache": str(cache),
                                     "dir": str(cell.dir), "device": device})
    return end_cell(cell.dir, meta, status, error, cpu, time.perf_counter() - start, interrupted=stopping.is_set())


def cell_record(cell: Cell, cache: Path, recipe: str, cache_info: dict, device: str, status: str) -> dict:
    """What cell.json holds about a cell before it ends (end_cell adds timing, status, error)."""
    return {"variant": cell.variant, "seed": cell.seed, "description": cell.description, "factors": cell.factors,
            "overrides": cell.overrides, "config": _normalised(cell.config), "cache": str(cache), **cache_info,
            "command": train_command(cell, recipe, cache, device), "status": status}


def begin_cell(cell: Cell, cache: Path, recipe: str, cache_info: dict, device: str) -> dict:
    meta = cell_record(cell, cache, recipe, cache_info, device, "running")
    start_record(cell.dir, meta)
    return meta


def collect_runs(cells: list[Cell]) -> pd.DataFrame:
    """One row per cell: factors (ablation, grid keys), variant, seed, status, scores in percent,
    gamma, selected iteration, training seconds, the cell's wall and CPU seconds, error text, folder."""
    rows = []
    for cell in cells:
        meta = read_json(cell.dir / CELL_FILE) or {}
        row = {**cell.factors, "variant": cell.variant, "seed": cell.seed, "description": cell.description,
               "status": meta.get("status", "not run"), "wall_s": meta.get("wall_seconds"),
               "cpu_s": meta.get("cpu_seconds"),
               "error": meta.get("error", ""), "dir": str(cell.dir)}
        summary = read_json(cell.dir / "summary.json") if row["status"] == "done" else None
        if summary is not None:
            test = summary["test"]
            row.update({k: 100 * test[k] for k in SCORE_COLUMNS}, gamma=test["gamma"], iteration=test["iteration"],
                       train_s=summary["selection"].get("train_seconds", 0.0) + summary["timing"]["final_train_seconds"])
            validation = summary["selection"].get("validation")  # what selection saw (never the test set)
            if validation:
                row.update(val_H=100 * validation["best"]["H"], val_ZSL=100 * validation["ZSL"])
        rows.append(row)
    frame = pd.DataFrame(rows)
    factor_columns = [c for c in frame.columns if c not in RUN_COLUMNS and c != "description"]
    return frame.reindex(columns=[*factor_columns, *RUN_COLUMNS, "description"])
