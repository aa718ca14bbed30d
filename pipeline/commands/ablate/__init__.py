"""`msdn ablate` end to end: plan (plan.py: options, presets), make sure the cache exists, run the
cells (local workers, grid.run_cells; or one Slurm job array, slurm_cells.submit_cells; or one cell
here, --cell), write the tables. Presets and their run times: plan.py and docs/ablations.md.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from cache.store import resolve_cache
from pipeline.commands.ablate.causal import results_rows, write_screen_tables
from pipeline.commands.ablate.grid import (
    AblationError,
    absolute_recipe,
    cell_record,
    cells_to_run,
    collect_runs,
    run_cells,
    worker_slots,
)
from pipeline.commands.ablate.plan import (  # noqa: F401 - AblateOptions, PRESETS: the package's interface
    PRESET_BACKBONE,
    PRESETS,
    AblateOptions,
    Plan,
    Preset,
    check_launcher,
    plan_ablation,
    schedule,
)
from pipeline.commands.ablate.slurm_cells import FOLDER as SLURM_FOLDER
from pipeline.commands.ablate.slurm_cells import run_cell, submit_cells
from pipeline.commands.ablate.status import ablation_status, write_plan  # noqa: F401 - ablation_status: cli
from pipeline.commands.tables import write_tables
from pipeline.launch import SlurmOptions, make_launcher
from pipeline.runlog import write_json_atomic


def run_ablate(options: AblateOptions, log=print) -> dict:
    """Plan (every config checked before anything runs), extract a preset's cache when missing, run
    the cells, write runs.csv / results.csv / results.md / results.tex and ablation.json in `out`.
    Returns {"runs": DataFrame, "paths", "seconds", "cache"}."""
    start = time.perf_counter()
    on_slurm = check_launcher(options)
    # a job (or a --cell task) must not depend on the shell's folder
    out = Path(options.out).resolve() if on_slurm or options.cell is not None else Path(options.out)
    plan = plan_ablation(options, out)
    if options.cell is not None:
        return run_one_cell(options, plan, out, log)
    preset, recipe, overrides, seeds, ablations, cells = (plan.preset, plan.recipe, plan.overrides, plan.seeds,
                                                          plan.ablations, plan.cells)
    screen = plan.screen
    slots = [] if on_slurm else worker_slots(options.device, options.workers)

    cache = resolve_cache(options.cache, options.cache_dir) if options.cache else None
    launcher = make_launcher("slurm", folder=out / SLURM_FOLDER, slurm=options.slurm or SlurmOptions()) if on_slurm else None
    if launcher is not None:  # before a preset's extraction: refusals come first
        cache = cache and cache.resolve()
        launcher.check([out, *([cache] if cache else [])], log=log)
    cache = cache or _extract_preset(preset, out, options.device, log)
    info = cache_info(cache)
    cells_to_run(cells, info["content_key"], options.overwrite)  # another run's folders: refused before the plan is written
    write_plan(cells, out)
    log(f"cache {cache}: {info['dataset']}, {info['backbone']} {info['image_size']} px; cells: {schedule(cells)}")
    caption = (f"{info['dataset']}, {info['backbone']} {info['image_size']} px, recipe {recipe}, {schedule(cells)}: "
               f"mean ± std over {len(seeds)} seeds (accuracies in %)")
    try:
        if on_slurm:
            job_id, submitted = submit_cells(cells, cache, launcher, recipe=absolute_recipe(recipe), cache_info=info,
                                             out=out, device=options.device, overwrite=options.overwrite,
                                             wait=options.wait, log=log)
            if not options.wait:
                return {"job_id": job_id, "cache": str(cache), "out": str(out)}
            runs = collect_runs(cells)
            runs.attrs["cells_run"] = submitted
        else:
            runs = run_cells(cells, cache, recipe=recipe, cache_info=info, slots=slots, overwrite=options.overwrite,
                             log=log)
    except KeyboardInterrupt:  # the tables of what finished so far, then stop
        runs = collect_runs(cells)
        write_tables(runs, out, caption=caption + "; INTERRUPTED, unfinished cells missing")
        if screen:
            write_screen_tables(runs, out)
        log(f"interrupted: tables of the finished cells in {out}; run the same command again to go on"
            + (" (it collects the array that keeps running)" if on_slurm else ""))
        raise
    seconds = time.perf_counter() - start
    paths = write_tables(runs, out, caption=caption)
    if screen:
        paths.update(write_screen_tables(runs, out))
        rows = results_rows(pd.read_csv(paths["paired"], index_col="variant"), runs)
        log("paired.md has each reading at its chosen weight; as rows of results.md: "
            + ", ".join(f"{k} = {v}" for k, v in rows.items() if k != v))
    previous = _read_history(out / "ablation.json")
    write_json_atomic(out / "ablation.json", {
        "preset": options.preset, "recipe": recipe, "cache": str(cache), **info, "seeds": seeds,
        "ablations": ablations, "grid": options.grid, "overrides": overrides, "workers": len(slots),
        "launcher": options.launcher,
        "cells": len(cells), "failed": int((runs["status"] == "failed").sum()),
        "cells_cpu_seconds": float(runs["cpu_s"].sum()),
        # one entry per invocation: a re-run that only skips finished cells keeps the first run's time
        "history": previous + [{"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_seconds": seconds,
                                "cells_run": runs.attrs.get("cells_run")}]})
    return {"runs": runs, "paths": paths, "seconds": seconds, "cache": str(cache)}


def run_one_cell(options: AblateOptions, plan: Plan, out: Path, log) -> dict:
    """--cell N: cell N of the plan (plan.json order), in this process, exactly as an array task of
    --launcher slurm runs it; a cell finished before is left alone. The entry point of a plain
    `sbatch --array` script (docs/slurm.md); `msdn ablate` without --cell then collects."""
    if not 0 <= options.cell < len(plan.cells):
        raise AblationError(f"--cell {options.cell}: the plan has {len(plan.cells)} cells (0-{len(plan.cells) - 1})")
    if options.cache is None:  # every task would extract it at once: a preset's cache must exist first
        preset = plan.preset
        cache = out / f"{preset.dataset}_{PRESET_BACKBONE}_{preset.image_size}.h5"
        if not cache.is_file():
            data = f" --data-root {out / 'data'}" if preset.demo_data else ""
            raise AblationError(f"--cell: the preset's cache {cache} is not there yet; extract it once first: msdn "
                                f"extract --dataset {preset.dataset} --backbone {PRESET_BACKBONE} --image-size "
                                f"{preset.image_size}{data} --out {cache}")
    else:
        cache = resolve_cache(options.cache, options.cache_dir).resolve()
    info = cache_info(cache)
    cell = plan.cells[options.cell]
    write_plan(plan.cells, out)
    if not cells_to_run([cell], info["content_key"], options.overwrite):
        log(f"cell {options.cell} ({cell.variant} seed {cell.seed}): finished before")
        return {"cell": options.cell, "status": "finished before"}
    recipe = absolute_recipe(plan.recipe)
    meta = cell_record(cell, cache, recipe, info, options.device, "running")
    text = run_cell({"recipe": recipe, "overrides": cell.overrides, "cache": str(cache), "dir": str(cell.dir),
                     "device": options.device}, meta)
    log(f"cell {options.cell} ({cell.variant} seed {cell.seed}): {text}")
    return {"cell": options.cell, "status": text}


def _read_history(path: Path) -> list:
    try:
        return list(json.loads(path.read_text()).get("history", []))
    except (OSError, ValueError, AttributeError):
        return []


def _extract_preset(preset: Preset, out: Path, device: str, log) -> Path:
    """The preset's cache in `out` (an up-to-date one is reused by the extraction engine, an
    interrupted one continued: there is no --resume to pass to `msdn ablate`)."""
    from pipeline.commands.extract import ExtractOptions, run_extract

    target = out / f"{preset.dataset}_{PRESET_BACKBONE}_{preset.image_size}.h5"
    return run_extract(ExtractOptions(dataset=preset.dataset, out=str(target), backbone=PRESET_BACKBONE,
                                      image_size=preset.image_size, device=device, progress=False, resume=True,
                                      data_root=str(out / "data") if preset.demo_data else None), log=log)


def cache_info(path: str | Path) -> dict:
    """Content key, dataset and backbone of a cache (TransZero files: what the data says)."""
    from cache.reader import FeatureCache
    from pipeline.checkpoint import cache_identity

    with FeatureCache(path) as cache:
        manifest = cache.manifest or {}
        backbone = manifest.get("backbone", {})
        return {"content_key": cache_identity(cache)["content_key"],
                "dataset": manifest.get("dataset", {}).get("name", Path(path).stem),
                "backbone": backbone.get("name", "unknown"), "image_size": backbone.get("image_size"),
                "feature_shape": list(cache.feature_shape)}
