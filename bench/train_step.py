"""Stage-2 throughput: training samples/s and evaluation images/s of the real engine.

    python bench/train_step.py --device auto --shape 2048 14 14 --attributes 312 --classes 200 \
        --images 2000 --steps 200 --amp auto --json out.json

Random features of a benchmark's shape (default: CUB with ResNet101 at 448 px) held in memory as a
feature cache would be; the engine (`pipeline.engine.fit` / `predict_scores`), the samplers, the
FeatureStore and the MSDN head are the real ones. On CPU, the share of the CPUs other processes
used meanwhile is reported next to each number (bench/cpu_meter.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cpu_meter import CpuMeter  # noqa: E402
from pipeline.config import apply_overrides, load_recipe  # noqa: E402
from pipeline.engine import build_model, fit, predict_scores, resolve_amp, resolve_device  # noqa: E402
from pipeline.store import FeatureStore  # noqa: E402
from pipeline.tasks import Task  # noqa: E402


class InMemoryFeatures:
    """The part of FeatureCache the engine reads, over random ReLU-like features."""

    def __init__(self, images: int, shape: tuple[int, int, int], attributes: int, classes: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.feature_shape = shape
        self._features = torch.rand((images, *shape), generator=g).relu_().half()
        self.att = np.abs(np.random.default_rng(seed).normal(size=(classes, attributes))).astype(np.float32)
        self.w2v_att = np.random.default_rng(seed + 1).normal(size=(attributes, 300)).astype(np.float32)

    def features(self, rows, device="cpu", dtype=torch.float16):
        return self._features[torch.as_tensor(rows)].to(device=device, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--recipe", default="CUB")
    p.add_argument("--shape", type=int, nargs=3, default=(2048, 14, 14), metavar=("C", "H", "W"))
    p.add_argument("--attributes", type=int, default=312)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--amp", nargs="+", default=["auto"], help="one or more of auto none bf16 fp16")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    device = resolve_device(args.device)
    config = apply_overrides(load_recipe(args.recipe), args.overrides)
    cache = InMemoryFeatures(args.images, tuple(args.shape), args.attributes, args.classes)
    seen = np.arange(int(args.classes * 0.75))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.classes, args.images)
    labels[: len(seen)] = seen  # every seen class has an image
    train_rows = np.flatnonzero(np.isin(labels, seen))
    task = Task("bench", np.arange(args.classes), seen, np.arange(len(seen), args.classes),
                train_rows, train_rows, np.flatnonzero(~np.isin(labels, seen)))
    store = FeatureStore(cache, np.arange(args.images), device, config.feature_dtype,
                         max_batch=max(config.batch_size, config.eval_batch_size))
    results = []
    for amp_name in args.amp:
        amp = resolve_amp(amp_name, device)
        model = build_model(config.head, cache, task, device, seed=0)
        fit(model, store, train_rows[:200], labels[train_rows[:200]], config, steps=5, amp=amp, progress=False)  # warm-up
        sync(device)
        with CpuMeter() as meter:
            timing = fit(model, store, train_rows, labels[train_rows], config, steps=args.steps, amp=amp,
                         progress=False)
            sync(device)
        start = time.perf_counter()
        predict_scores(model, store, np.arange(args.images), batch_size=config.eval_batch_size, amp=amp)
        sync(device)
        eval_s = time.perf_counter() - start
        row = {"device": str(device), "amp": amp, "recipe": config.recipe, "shape": list(args.shape),
               "batch": config.batch_size, "sampler": config.sampler, "steps": args.steps,
               "train_samples_per_s": timing["samples_per_s"], "train_step_ms": 1e3 * timing["seconds"] / args.steps,
               "eval_images_per_s": args.images / eval_s, "features_on_device": store.resident,
               "cpu_foreign_share": meter.foreign_share if device.type == "cpu" else None}
        results.append(row)
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
