"""`msdn ablate` end to end: resolve a preset, make sure its cache exists, plan, run, write tables.

Presets are the README's worked examples, each one command:
  demo   - the rendered demo set (extracted into <out>/ once), every built-in ablation, 3 seeds,
           the demo recipe's own 300 steps (what `msdn demo` trains): 36 runs;
  cub100 - CUB-100 real photos, EfficientNet-Lite0 at 224 px, the CUB100 recipe cut to 800 steps,
           8 ablations, 2 seeds (a benchmark, extraction included);
(their run times: README, "Ablations, reports and pictures")
  causal - the causal-attention screen (pipeline/commands/ablate/causal.py): CUB-100 at 224 px, MSDN and 6
           readings of the causal term x 2 weights x 3 seeds, weight chosen on validation, paired
           differences to MSDN in paired.md; `--set` and `--seeds` as usual (448 px: --cache).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cache.store import resolve_cache
from pipeline.commands.ablate.causal import BASELINE, chosen_weights, plan_screen, results_rows, write_screen_tables
from pipeline.commands.ablate.grid import (
    AblationError,
    absolute_recipe,
    builtin_ablations,
    cells_to_run,
    collect_runs,
    plan_cells,
    run_cells,
    worker_slots,
)
from pipeline.commands.ablate.slurm_cells import FOLDER as SLURM_FOLDER
from pipeline.commands.ablate.slurm_cells import submit_cells
from pipeline.commands.ablate.status import ablation_status, write_plan  # noqa: F401 - ablation_status: cli
from pipeline.commands.tables import write_tables
from pipeline.config import apply_overrides, load_recipe
from pipeline.launch import SlurmOptions, make_launcher
from pipeline.runlog import write_json_atomic

PRESET_BACKBONE = "efficientnet_lite0"  # the one ImageNet backbone available without a download


@dataclass(frozen=True)
class Preset:
    dataset: str
    recipe: str
    image_size: int
    seeds: tuple[int, ...]
    ablations: tuple[str, ...] | None  # None: every built-in ablation
    overrides: tuple[str, ...] = ()
    demo_data: bool = False  # render the demo images into <out>/data
    causal_weights: tuple[float, ...] = ()  # a causal screen: these lambda_causal values per variant


PRESETS = {
    # 3 seeds: on the demo one seed against another moves H by up to 18 points, so 2 say little
    "demo": Preset("demo", "demo", 224, (0, 1, 2), None, (), demo_data=True),
    # 800 steps (~18 epochs) instead of the recipe's 1300 and the 8 most telling ablations (add the
    # counterfactual types with --ablation all): 16 cells, measured 2,271 s on 2 free cores
    "cub100": Preset("CUB100", "CUB100", 224, (0, 1),
                     ("full", "no_causal", "ava_only", "vaa_only", "no_distill", "no_calibration",
                      "test_ava", "test_vaa"),
                     ("iterations=800", "eval_every=100")),
    # bf16 autocast: on CUB-100 within 0.05 points of float32 and 1.8x faster on an AVX512-BF16 CPU;
    # every cell of a screen uses it, so the comparison stays fair. 39 cells.
    "causal": Preset("CUB100", "CUB100", 224, (0, 1, 2), None, ("iterations=800", "eval_every=100", "amp=bf16"),
                     causal_weights=(0.03, 0.3)),
}


@dataclass
class AblateOptions:
    out: str
    recipe: str | None = None
    cache: str | None = None
    preset: str | None = None
    ablations: list[str] | None = None   # names, ["all"] or ["none"]; None: the preset's, else all without a grid
    grid: list[str] = field(default_factory=list)
    seeds: list[int] | None = None
    overrides: list[str] = field(default_factory=list)
    workers: int | None = None
    device: str = "auto"
    overwrite: bool = False
    weights_from: str | None = None  # causal preset: a screen's paired.csv, whose chosen weights are used
    cache_dir: str | None = None     # the store that --cache keys are looked up in [default: $MSDN_CACHE_DIR]
    launcher: str = "local"          # "local": worker processes here; "slurm": one job array (slurm_cells.py)
    slurm: SlurmOptions | None = None
    wait: bool = True                # slurm: wait for the array and write the tables; False: submit and return


def run_ablate(options: AblateOptions, log=print) -> dict:
    """Plan (every config checked before anything runs), extract a preset's cache when missing, run
    the cells, write runs.csv / results.csv / results.md / results.tex and ablation.json in `out`.
    Returns {"runs": DataFrame, "paths", "seconds", "cache"}."""
    start = time.perf_counter()
    on_slurm = _check_launcher(options)
    out = Path(options.out).resolve() if on_slurm else Path(options.out)  # the job must not depend on the shell's folder
    preset = _preset(options.preset)
    recipe = options.recipe or (preset.recipe if preset else None)
    if recipe is None or (options.cache is None and preset is None):
        raise AblationError(f"give --recipe and --cache, or --preset ({', '.join(PRESETS)})")
    screen = bool(preset and preset.causal_weights)
    if screen and options.grid:
        raise AblationError("--grid does not apply to --preset causal: the screen crosses each reading with its "
                            "own lambda_causal weights (the preset's, or --weights-from's); for a grid of your own, "
                            "give --recipe and --cache instead of the preset")
    if options.weights_from and not screen:
        raise AblationError("--weights-from applies to --preset causal only (the weights a causal screen chose)")
    overrides = list(preset.overrides if preset else ()) + list(options.overrides)
    seeds = options.seeds or list(preset.seeds if preset else (0, 1))
    every = list(builtin_ablations(apply_overrides(load_recipe(recipe), overrides)))
    ablations = options.ablations
    if ablations is None:
        ablations = list(preset.ablations) if preset and preset.ablations else ([] if options.grid else every)
    ablations = every if ablations == ["all"] else ([] if ablations == ["none"] else ablations)
    if screen:
        weights = chosen_weights(options.weights_from) if options.weights_from else preset.causal_weights
        variants = {("all",): None, ("none",): [BASELINE]}.get(tuple(options.ablations or ()), options.ablations)
        cells = plan_screen(recipe, out, weights=weights, seeds=seeds, overrides=overrides,
                            variants=variants or (list(weights) if isinstance(weights, dict) else None))
        ablations = list(dict.fromkeys(c.factors["ablation"] for c in cells))
    else:
        cells = plan_cells(recipe, out, ablations=ablations, grid=options.grid, seeds=seeds, overrides=overrides)
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


def schedule(cells) -> str:
    """The cells' step schedule and precision, e.g. "800 steps, validation every 100, amp bf16"
    (several values where a grid varies them)."""
    def values(get) -> str:
        return "/".join(dict.fromkeys(str(get(c.config)) for c in cells))

    return (f"{values(lambda c: c.iterations)} steps, validation every {values(lambda c: c.eval_every)}, "
            f"selection {values(lambda c: c.selection)}, amp {values(lambda c: c.amp)}"
            + (" (auto: bf16 on CUDA, float32 on CPU)" if any(c.config.amp == "auto" for c in cells) else ""))


def _check_launcher(options: AblateOptions) -> bool:
    """True for --launcher slurm; options that the chosen launcher would ignore are errors."""
    if options.launcher not in ("local", "slurm"):
        raise AblationError(f"--launcher {options.launcher!r}: expected local or slurm")
    if options.launcher == "slurm":
        if options.workers is not None:
            raise AblationError("--workers applies to --launcher local; on Slurm use --array-parallelism")
        return True
    if options.slurm is not None and options.slurm != SlurmOptions():
        raise AblationError("the --slurm-*, --cpus-per-task, --gpus-per-task, --mem and --array-parallelism "
                            "options apply to --launcher slurm only")
    if not options.wait:
        raise AblationError("--no-wait applies to --launcher slurm only")
    return False


def _read_history(path: Path) -> list:
    try:
        return list(json.loads(path.read_text()).get("history", []))
    except (OSError, ValueError, AttributeError):
        return []


def _preset(name: str | None) -> Preset | None:
    if name is None:
        return None
    if name.lower() not in PRESETS:
        raise AblationError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name.lower()]


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
