"""What `msdn ablate` will run: the options, the presets (the worked examples of docs/ablations.md, each one
command), and the plan they resolve to, every cell's config checked before anything runs.

Presets:
  demo   - the rendered demo set (extracted into <out>/ once), every built-in ablation, 3 seeds,
           the demo recipe's own 300 steps (what `msdn demo` trains): 36 runs;
  cub100 - CUB-100 real photos, EfficientNet-Lite0 at 224 px, the CUB100 recipe cut to 800 steps,
           8 ablations, 2 seeds (a benchmark, extraction included);
(their run times: docs/ablations.md)
  causal - the causal-attention screen (pipeline/commands/ablate/causal.py): CUB-100 at 224 px, MSDN and 6
           readings of the causal term x 2 weights x 3 seeds, weight chosen on validation, paired
           differences to MSDN in paired.md; `--set` and `--seeds` as usual (448 px: --cache).
Options that the chosen preset or launcher would silently ignore are errors instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.commands.ablate.causal import BASELINE, chosen_weights, plan_screen
from pipeline.commands.ablate.grid import AblationError, Cell, builtin_ablations, plan_cells
from pipeline.config import apply_overrides, load_recipe
from pipeline.launch import SlurmOptions

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
    cell: int | None = None          # run only this cell of the plan, here (a plain `sbatch --array` task)
    launcher: str = "local"          # "local": worker processes here; "slurm": one job array (slurm_cells.py)
    slurm: SlurmOptions | None = None
    wait: bool = True                # slurm: wait for the array and write the tables; False: submit and return


@dataclass
class Plan:
    preset: Preset | None
    recipe: str
    overrides: list[str]
    seeds: list[int]
    ablations: list[str]
    cells: list[Cell]

    @property
    def screen(self) -> bool:
        return bool(self.preset and self.preset.causal_weights)


def plan_ablation(options: AblateOptions, out: Path) -> Plan:
    """The cells `options` ask for, in `out` (every config resolved now)."""
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
    return Plan(preset, recipe, overrides, seeds, ablations, cells)


def schedule(cells) -> str:
    """The cells' step schedule and precision, e.g. "800 steps, validation every 100, amp bf16"
    (several values where a grid varies them)."""
    def values(get) -> str:
        return "/".join(dict.fromkeys(str(get(c.config)) for c in cells))

    return (f"{values(lambda c: c.iterations)} steps, validation every {values(lambda c: c.eval_every)}, "
            f"selection {values(lambda c: c.selection)}, amp {values(lambda c: c.amp)}"
            + (" (auto: bf16 on CUDA, float32 on CPU)" if any(c.config.amp == "auto" for c in cells) else ""))


def check_launcher(options: AblateOptions) -> bool:
    """True for --launcher slurm; options that the chosen launcher would ignore are errors."""
    if options.launcher not in ("local", "slurm"):
        raise AblationError(f"--launcher {options.launcher!r}: expected local or slurm")
    if options.launcher == "slurm":
        if options.cell is not None:
            raise AblationError("--cell runs one cell in this process (a task of your own sbatch script); "
                                "it does not go with --launcher slurm")
        if options.workers is not None:
            raise AblationError("--workers applies to --launcher local; on Slurm use --array-parallelism")
        return True
    if options.slurm is not None and options.slurm != SlurmOptions():
        raise AblationError("the --slurm-*, --cpus-per-task, --gpus-per-task, --mem and --array-parallelism "
                            "options apply to --launcher slurm only")
    if not options.wait:
        raise AblationError("--no-wait applies to --launcher slurm only")
    if options.cell is not None and options.workers is not None:
        raise AblationError("--workers does not go with --cell (one cell, in this process)")
    return False


def _preset(name: str | None) -> Preset | None:
    if name is None:
        return None
    if name.lower() not in PRESETS:
        raise AblationError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name.lower()]
