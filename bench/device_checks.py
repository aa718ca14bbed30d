"""The sections of bench/device_suite.py: correctness first, then stage 1 and stage 2 speed, then the demo.

Each section takes a Shape (the full CUB/ResNet101 sizes on a GPU, miniatures with --quick) and
returns a flat dict of figures; every path is the project's own (extract/extractor.py's
extract_features, pipeline/engine.py's train_step / predict_scores through bench/train.py's
Project, `msdn demo` as a subprocess).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.backbone_forward import time_forward  # noqa: E402
from bench.train import BATCH, Project, flops, matmul_seconds, sync, write_cache  # noqa: E402
from cache.reader import FeatureCache  # noqa: E402
from extract.backbones import BackboneSpec  # noqa: E402
from extract.datasets import build_dataset  # noqa: E402
from extract.extractor import extract_features  # noqa: E402
from extract.loader import default_batch_size  # noqa: E402
from heads.config import HeadConfig  # noqa: E402
from pipeline.engine import autocast, build_model, predict_scores  # noqa: E402
from pipeline.features import ResidentFeatures  # noqa: E402
from pipeline.tasks import benchmark_task, usable_splits  # noqa: E402

CUB_RECIPE_STEPS, CUB_RECIPE_EVALS, CUB_TEST_IMAGES = 4234, 30, 4731
# Stated tolerances: relative to the largest magnitude of the CPU float32 reference.
TOLERANCE = {"heads_float32": 1e-3, "heads_bf16": 5e-2, "extract_rows": 5e-2}


@dataclasses.dataclass(frozen=True)
class Shape:
    """Problem sizes: CUB-shaped on a GPU, miniature with --quick (same code, same JSON fields)."""
    channels: int = 2048
    grid: int = 14
    attributes: int = 312
    classes: int = 200
    cache_images: int = 600           # resident synthetic features (a step's cost does not depend on it)
    recipe_steps: int = CUB_RECIPE_STEPS
    test_images: int = CUB_TEST_IMAGES
    image_size: int = 448
    extract_per_class: int = 32       # demo images rendered per class (24 classes)
    extract_repeat: int = 4           # the large extraction run cycles the rendered images this often
    bare_seconds: float = 3.0
    demo_args: tuple[str, ...] = ()

    @staticmethod
    def quick() -> "Shape":
        return Shape(channels=32, grid=2, attributes=12, classes=10, cache_images=60, recipe_steps=5,
                     test_images=50, image_size=64, extract_per_class=2, extract_repeat=2, bare_seconds=0.3,
                     demo_args=("--images-per-class", "3", "--set", "iterations=20", "--set", "eval_every=10"))


def rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (0 when both are zero)."""
    got, ref = got.double().cpu(), ref.double().cpu()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _losses_and_grads(model, features, labels, amp: str, device: torch.device):
    model.train()
    model.zero_grad(set_to_none=True)
    with autocast(amp, device):
        losses = model.loss(model(features, counterfactual=False), labels)
    losses["loss"].backward()
    grads = {name: p.grad.detach().float().cpu() for name, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach().float().cpu() for k, v in losses.items()}, grads


def check_heads(device: torch.device, shape: Shape, workdir: Path) -> dict:
    """Losses and gradients of the MSDN heads on one batch of 50: CPU float32 (reference) against
    `device` in float32 and under bf16 autocast, from the same seeded parameters."""
    path = write_cache(workdir / "heads.h5", 120, shape.channels, shape.grid, shape.classes, shape.attributes)
    cpu = torch.device("cpu")
    result = {}
    with FeatureCache(path) as cache:
        labels = np.asarray(cache.labels)
        task = benchmark_task(labels, usable_splits(cache)[0], num_classes=int(cache.att.shape[0]))
        rows = np.sort(task.train_rows[:BATCH])
        targets = torch.as_tensor(task.local_labels(labels[rows]))
        reference = build_model(HeadConfig(), cache, task, cpu, seed=0)
        bank = {d: ResidentFeatures(cache, rows, d, "float32") for d in {cpu, device}}
        ref_losses, ref_grads = _losses_and_grads(reference, bank[cpu].gather(bank[cpu].positions(rows)),
                                                  targets, "none", cpu)
        for name, amp in (("float32", "none"), ("bf16", "bf16")):
            model = copy.deepcopy(reference).to(device)
            store = bank[device]
            losses, grads = _losses_and_grads(model, store.gather(store.positions(rows)), targets.to(device),
                                              amp, device)
            loss_diff = max(rel_diff(losses[k], ref_losses[k]) for k in ref_losses)
            grad_diff = max(rel_diff(grads[k], ref_grads[k]) for k in ref_grads)
            result[f"heads_{name}_loss_rel_diff"] = loss_diff
            result[f"heads_{name}_grad_rel_diff"] = grad_diff
            result[f"heads_{name}_tolerance"] = TOLERANCE[f"heads_{name}"]
            result[f"heads_{name}_ok"] = max(loss_diff, grad_diff) <= TOLERANCE[f"heads_{name}"]
        result["heads_loss_cpu_float32"] = float(ref_losses["loss"])
    return result


def demo_dataset(root: Path, per_class: int, repeat: int = 1, first: int | None = None):
    """The rendered demo set (24 classes x per_class images); `repeat` cycles its images (a larger
    extraction without rendering more), `first` keeps only the first rows."""
    dataset = build_dataset("demo", root=root, images_per_class=per_class)
    n = dataset.num_images if first is None else first
    paths = (dataset.image_paths[:n]) * repeat
    keep = np.arange(len(paths))
    return dataclasses.replace(
        dataset, image_paths=paths, labels=np.tile(dataset.labels[:n], repeat),
        boxes=np.tile(dataset.boxes[:n], (repeat, 1)),
        splits={k: keep[np.isin(keep % n, v[v < n])] for k, v in dataset.splits.items()})


def backbone_spec(name: str, image_size: int, workdir: Path) -> BackboneSpec:
    """Random-init weights (speed does not depend on them). ResNet101's plain random init grows its
    activations block by block (max ~2.5e5 at 448 px: inf in float16 rows), so each residual
    branch's last BatchNorm scale is cut to 0.2: maps of ImageNet-like magnitude (max ~1.3), every
    convolution still exercised. EfficientNet-Lite0's ReLU6 keeps its random maps bounded."""
    if name != "resnet101":
        return BackboneSpec(name, image_size, "random")
    path = workdir / "resnet101_tamed_random.pt"
    if not path.exists():
        from extract.backbones import BACKBONES
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            state = BACKBONES[name].make_model().state_dict()
        torch.save({k: v * 0.2 if k.endswith("bn3.weight") else v for k, v in state.items()}, path)
    return BackboneSpec(name, image_size, str(path))


def _extract(dataset, spec: BackboneSpec, out: Path, device: torch.device, dtype: str = "float16") -> float:
    """Seconds of one real extraction."""
    start = time.perf_counter()
    extract_features(dataset, spec, out, device=str(device), dtype=dtype, overwrite=True, progress=False,
                     log=lambda msg: None)
    return time.perf_counter() - start


def check_extract(device: torch.device, shape: Shape, workdir: Path) -> dict:
    """Rows of 8 demo images extracted with ResNet101 on `device` (bf16 autocast on CUDA, stored
    float16) against CPU float32 rows (same weights: backbone_spec)."""
    import h5py
    dataset = demo_dataset(workdir / "demo_check", per_class=2, first=8)
    spec = backbone_spec("resnet101", shape.image_size, workdir)
    _extract(dataset, spec, workdir / "rows_cpu.h5", torch.device("cpu"), dtype="float32")
    _extract(dataset, spec, workdir / "rows_dev.h5", device)
    with h5py.File(workdir / "rows_cpu.h5") as a, h5py.File(workdir / "rows_dev.h5") as b:
        diff = rel_diff(torch.from_numpy(b["feature_map"][:].astype(np.float32)),
                        torch.from_numpy(a["feature_map"][:]))
    return {"extract_rows_rel_diff": diff, "extract_rows_tolerance": TOLERANCE["extract_rows"],
            "extract_rows_ok": diff <= TOLERANCE["extract_rows"], "extract_rows_images": dataset.num_images}


def stage1(device: torch.device, shape: Shape, workdir: Path, backbone: str) -> dict:
    """Extraction images/s (decoding overlapped, the engine's defaults) against the bare forward
    of the same model in this run; peak GPU memory of the extraction."""
    from extract.backbones import build_backbone
    spec = backbone_spec(backbone, shape.image_size, workdir)
    batch = default_batch_size(backbone, shape.image_size, device)
    bare = time_forward(build_backbone(spec), shape.image_size, batch, "channels_last", device,
                        min_images=2 * batch, min_seconds=shape.bare_seconds)
    small = demo_dataset(workdir / "demo_speed", shape.extract_per_class)
    large = demo_dataset(workdir / "demo_speed", shape.extract_per_class, repeat=shape.extract_repeat)
    if device.type == "cuda":
        _extract(small, spec, workdir / f"{backbone}_warm.h5", device)  # cudnn autotuning, page cache
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = [_extract(d, spec, workdir / f"{backbone}_{d.num_images}.h5", device) for d in (small, large)]
    for rows in workdir.glob(f"{backbone}_*.h5"):
        rows.unlink()  # ResNet101 at 448 px: 0.8 MB a row, gigabytes in all
    rate = (large.num_images - small.num_images) / max(seconds[1] - seconds[0], 1e-9)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {f"{backbone}_bare_images_per_s": bare, f"{backbone}_extract_images_per_s": rate,
            f"{backbone}_extract_over_bare": rate / bare, f"{backbone}_batch": batch,
            f"{backbone}_extract_images": [small.num_images, large.num_images],
            f"{backbone}_extract_seconds": seconds, f"{backbone}_peak_gpu_memory_mb": peak}


def stage2(device: torch.device, shape: Shape, workdir: Path) -> dict:
    """A full CUB-shaped recipe's training steps (features resident on the device) and the CUB test
    set's evaluation, timed; the achieved share of the measured matmul rate."""
    path = write_cache(workdir / "stage2.h5", shape.cache_images, shape.channels, shape.grid, shape.classes,
                       shape.attributes)
    amp = "bf16" if device.type == "cuda" else "none"
    matmul_dtype = torch.bfloat16 if amp == "bf16" else torch.float32
    with FeatureCache(path) as cache:
        project = Project(cache, device, amp, seed=0)
        for _ in range(3):
            project.train_step()  # warm-up: allocator, autotuning
        sync(device)
        start = time.perf_counter()
        for _ in range(shape.recipe_steps):
            project.train_step()
        sync(device)
        train_s = time.perf_counter() - start
        rows = np.resize(project.eval_rows, shape.test_images)
        eval_batch = 1000 if device.type == "cuda" else 200
        predict_scores(project.model, project.store, rows[:eval_batch], batch_size=eval_batch, amp=amp)
        sync(device)
        start = time.perf_counter()
        predict_scores(project.model, project.store, rows, batch_size=eval_batch, amp=amp).argmax(1).cpu()
        eval_s = time.perf_counter() - start
    regions = shape.grid ** 2
    rate = 2.0 * BATCH * regions * shape.channels * 4 * shape.attributes / matmul_seconds(
        BATCH * regions, shape.channels, 4 * shape.attributes, matmul_dtype, device, "wall")
    achieved = flops(BATCH, regions, shape.channels, shape.attributes, True) * shape.recipe_steps / train_s
    side = 8192 if device.type == "cuda" else 512  # a square product: the device's ceiling
    square = 2.0 * side ** 3 / matmul_seconds(side, side, side, matmul_dtype, device, "wall")
    return {"recipe_steps": shape.recipe_steps, "recipe_train_s": train_s, "test_images": shape.test_images,
            "test_eval_s": eval_s, "recipe_with_evals_s": train_s + CUB_RECIPE_EVALS * eval_s,
            "amp": amp, "matmul_dtype": str(matmul_dtype).replace("torch.", ""),
            "matmul_tflops": rate / 1e12, "square_matmul_tflops": square / 1e12, "square_matmul_side": side,
            "train_tflops": achieved / 1e12, "train_share_of_matmul": achieved / rate,
            "train_share_of_square_matmul": achieved / square}


def demo(device: torch.device, shape: Shape, workdir: Path, timeout_s: float) -> dict:
    """`msdn demo` end to end (a fresh interpreter, the tree's own cli.py), its table and wall time."""
    cmd = [sys.executable, "-c", "import cli; cli.main()", "demo", "--out", str(workdir / "demo_run"),
           "--device", str(device), "--quiet", *shape.demo_args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=max(1.0, timeout_s))
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"msdn demo failed (rc {done.returncode}): {done.stderr.strip()[-1500:]}")
    table = [line for line in done.stdout.splitlines() if re.match(r"^\s+ZSL|^test", line) or "run folder" in line]
    scores = table[1].split() if len(table) > 1 else []
    return {"demo_wall_s": wall, "demo_table": "\n".join(table),
            "demo_test_zsl": float(scores[1]) if len(scores) > 1 else None,
            "demo_test_h": float(scores[4]) if len(scores) > 4 else None}
