"""Training and evaluation speed of the MSDN++ head on CUB-shaped synthetic feature caches.

One run measures, per grid (2048 x 14 x 14 and 2048 x 7 x 7; 312 attributes, 200 classes, batch 50):
  project    the engine `msdn train` / `msdn evaluate` run (pipeline/engine.py): a ResidentFeatures
             holding the rows as a resident RegionBank (pre-normalised, bfloat16 or float16),
             the recipe's sampler drawing batch indices on the device, `engine.train_step` (the
             fused one-GEMM head, bf16 autocast or float32, RMSprop), `engine.predict_scores`
             (large no-grad batches);
  reference  the same maths written the obvious way (heads/reference.py: one einsum per product,
             float32), the batch copied from a float32 numpy array each step, evaluation in
             batches of 100 (the released helper's size), default glibc allocator;
  matmul     torch.mm of the step's GEMM shape in float32 and bfloat16: the machine's ceiling.
The three are interleaved round by round (a shared machine's load changes over minutes) and every
ratio is taken within a round, then the median over rounds is reported.

The caches are real HDF5 files (random float16 maps, TransZero keys) read through
cache.reader.FeatureCache. `--device cuda` runs the same code on a GPU (features on the device,
bf16 autocast, synchronised timings) and estimates a full CUB recipe (4,234 steps of 50 plus the
released scripts' 30 evaluations of the 4,731 test images).

    python bench/train.py [--device cpu|cuda|auto] [--images 2000] [--rounds 3] [--json out.json]

On a shared CPU (other processes' share is printed per round) wall-clock numbers with several
threads mostly measure the neighbours: `--threads 1 --clock cpu` counts only the CPU time this
process got, which gives stable ratios and fractions of the matmul ceiling.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cpu_meter import CpuMeter, wait_until_idle  # noqa: E402
from cache.reader import FeatureCache  # noqa: E402
from heads.config import HeadConfig  # noqa: E402
from heads.msdn import MSDN  # noqa: E402
from heads.reference import ReferenceMSDN  # noqa: E402
from heads.runtime import keep_freed_memory  # noqa: E402
from pipeline.config import load_recipe  # noqa: E402
from pipeline.engine import build_model, build_optimizer, predict_scores, train_step  # noqa: E402
from pipeline.features import ResidentFeatures, bank_dtype  # noqa: E402
from pipeline.samplers import build_sampler  # noqa: E402
from pipeline.tasks import benchmark_task, usable_splits  # noqa: E402

BATCH, REF_EVAL_BATCH, W2V_DIM = 50, 100, 300
RECIPE_STEPS, RECIPE_EVALS, CUB_TEST_IMAGES = 4234, 30, 1764 + 2967


def write_cache(path: Path, images: int, channels: int, grid: int, classes: int, attributes: int,
                seed: int = 0) -> Path:
    """A CUB-shaped cache with TransZero's keys: post-ReLU-like random float16 maps."""
    rng = np.random.default_rng(seed)
    seen = classes * 3 // 4
    labels = rng.integers(0, classes, images)
    is_seen = labels < seen
    seen_rows, unseen_rows = np.flatnonzero(is_seen), np.flatnonzero(~is_seen)
    cut = len(seen_rows) * 4 // 5
    with h5py.File(path, "w") as f:
        maps = f.create_dataset("feature_map", (images, channels, grid, grid), dtype=np.float16,
                                chunks=(1, channels, grid, grid))
        for start in range(0, images, 64):
            n = min(64, images - start)
            maps[start:start + n] = np.maximum(rng.standard_normal((n, channels, grid, grid),
                                                                   dtype=np.float32), 0)
        f["labels"] = labels
        f["trainval_loc"], f["test_seen_loc"] = seen_rows[:cut], seen_rows[cut:]
        f["test_unseen_loc"] = unseen_rows
        f["att"] = f["original_att"] = rng.random((classes, attributes), dtype=np.float32)
        f["w2v_att"] = rng.standard_normal((attributes, W2V_DIM), dtype=np.float32)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, device: torch.device, repeat: int = 1, clock: str = "wall") -> float:
    """Seconds per call, synchronised so queued GPU work is counted. clock="cpu" (one thread
    only) counts the CPU time this process got: on a shared machine it excludes the time other
    processes held the core, so the numbers do not depend on their load."""
    now = CLOCKS[clock]
    sync(device)
    start = now()
    for _ in range(repeat):
        fn()
    sync(device)
    return (now() - start) / repeat


def rmsprop(params):  # the CUB recipe's optimiser (docs/method.md, "Recipes")
    return torch.optim.RMSprop([p for p in params if p.requires_grad], lr=1e-4, alpha=0.99,
                               eps=1e-8, weight_decay=1e-4, momentum=0.9)


def flops(images: int, regions: int, channels: int, attributes: int, train: bool) -> float:
    """Matmul FLOPs: the (B*R, f) @ (f, 4A) projection, its weight gradient when training (the
    features need none), and building P = V [W] (forward; x3 with both gradients)."""
    big = 2.0 * images * regions * channels * 4 * attributes
    build = 2.0 * attributes * W2V_DIM * 4 * channels
    return 2 * big + 3 * build if train else big + build


class Project:
    """The training/evaluation engine's own path (pipeline/engine.py): the benchmark task built as
    `msdn train` builds it, a ResidentFeatures (its RegionBank resident on the device), the recipe's
    sampler drawing batches on the device, `engine.train_step` and `engine.predict_scores`."""

    def __init__(self, cache: FeatureCache, device: torch.device, amp: str, seed: int):
        labels = np.asarray(cache.labels)
        task = benchmark_task(labels, usable_splits(cache)[0], num_classes=int(cache.att.shape[0]))
        self.device, self.amp = device, amp
        config = load_recipe("CUB")
        self.model = build_model(HeadConfig(), cache, task, device, seed)
        self.optimizer = build_optimizer(self.model, config)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.store = ResidentFeatures(cache, np.concatenate([task.train_rows, task.eval_seen_rows,
                                                         task.eval_unseen_rows]),
                                  device, bank_dtype("float16", amp), max_batch=1000)
        self.train_positions = self.store.positions(task.train_rows)
        self.labels = torch.as_tensor(task.local_labels(labels[task.train_rows]), device=self.store.index_device)
        self.sample = build_sampler(config.sampler, self.labels, BATCH, seed)
        self.eval_rows = np.concatenate([task.eval_seen_rows, task.eval_unseen_rows])

    def train_step(self) -> None:
        picked = self.sample()
        train_step(self.model, self.optimizer, self.scaler, self.store.gather(self.train_positions[picked]),
                   self.labels[picked].to(self.device, non_blocking=True), amp=self.amp, causal_scale=0.0)

    def evaluate(self, count: int, batch: int) -> torch.Tensor:
        return predict_scores(self.model, self.store, self.eval_rows[:count], batch_size=batch,
                              amp=self.amp).argmax(1)


class Reference:
    def __init__(self, cache: FeatureCache, device: torch.device, seed: int):
        torch.manual_seed(seed)
        self.device = device
        head = MSDN(HeadConfig(), torch.from_numpy(cache.att), torch.from_numpy(cache.w2v_att),
                    torch.from_numpy(cache.seen_classes), torch.from_numpy(cache.unseen_classes),
                    cache.feature_shape[0])
        self.model = ReferenceMSDN(head).to(device)
        self.optimizer = rmsprop(self.model.parameters())
        self.features = cache.features(dtype=torch.float32).numpy()  # as the released loader
        self.labels = cache.labels
        self.train_rows = cache.splits["trainval_loc"]
        self.eval_rows = np.concatenate([cache.splits["test_seen_loc"], cache.splits["test_unseen_loc"]])
        self.rng = np.random.default_rng(seed)

    def train_step(self) -> None:
        rows = self.rng.choice(self.train_rows, BATCH)
        x = torch.from_numpy(self.features[rows]).to(self.device)
        y = torch.from_numpy(self.labels[rows]).to(self.device)
        s1, s2 = self.model(x)
        loss = self.model.loss(s1, s2, y)["loss"]
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def evaluate(self, count: int) -> torch.Tensor:
        rows, predictions = self.eval_rows[:count], []
        for start in range(0, len(rows), REF_EVAL_BATCH):
            s1, s2 = self.model(torch.from_numpy(self.features[rows[start:start + REF_EVAL_BATCH]])
                                .to(self.device))
            predictions.append((0.9 * s1 + 0.1 * s2).argmax(1))
        return torch.cat(predictions)


def matmul_seconds(rows: int, channels: int, cols: int, dtype: torch.dtype, device,
                   clock: str) -> float:
    a = torch.rand(rows, channels, device=device).to(dtype)
    b = torch.rand(cols, channels, device=device).to(dtype)
    torch.mm(a, b.t())
    return timed(lambda: torch.mm(a, b.t()), device, 20 if device.type == "cuda" else 2, clock)


def measure_grid(args, path: Path, device: torch.device) -> dict:
    with FeatureCache(path) as cache:
        f, H, W = cache.feature_shape
        R, A = H * W, cache.att.shape[1]
        amps = {"project-bf16": "bf16", "project-fp32": "none"}
        projects = {name: Project(cache, device, amp, args.seed) for name, amp in amps.items()}
        keep_freed_memory(False)
        reference = Reference(cache, device, args.seed)
        agreement = first_batch_agreement(projects["project-fp32"], reference)
        keep_freed_memory(True)
        eval_count = min(args.eval_images, len(reference.eval_rows))
        runners = {name: (p.train_step, lambda p=p: p.evaluate(eval_count, args.eval_batch))
                   for name, p in projects.items()}
        runners["reference"] = (reference.train_step, lambda: reference.evaluate(eval_count))
        for name, (train, evaluate) in runners.items():  # warm-up: allocator, oneDNN, autotuning
            keep_freed_memory(name != "reference")
            for warm in (train, train, evaluate):
                warm()
        rounds = []
        for _ in range(args.rounds):
            record = {}
            with CpuMeter() as meter:
                for name, (train, evaluate) in runners.items():
                    keep_freed_memory(name != "reference")
                    record[name] = {"train_s_per_step": timed(train, device, args.steps, args.clock),
                                    "eval_s_per_image": timed(evaluate, device, 1, args.clock)
                                    / eval_count}
                keep_freed_memory(True)
                record["matmul_s"] = {name: matmul_seconds(BATCH * R, f, 4 * A, dtype, device,
                                                           args.clock)
                                      for name, dtype in (("float32", torch.float32),
                                                          ("bfloat16", torch.bfloat16))}
            record["foreign_cpu_share"] = meter.foreign_share if device.type == "cpu" else None
            rounds.append(record)
    return summarise(rounds, R, f, A, args, agreement)


@torch.no_grad()
def first_batch_agreement(project: Project, reference: Reference) -> float:
    """Both start from the same seeded parameters: their scores on one batch must agree (up to the
    float16 storage of the pre-normalised bank)."""
    rows = np.sort(reference.eval_rows[:8])
    s1, _ = reference.model(torch.from_numpy(reference.features[rows]).to(reference.device))
    out = project.model(project.store.gather(project.store.positions(rows)))
    return float((out.s1 - s1).abs().max() / s1.abs().max())


def summarise(rounds: list[dict], R: int, f: int, A: int, args, agreement: float) -> dict:
    train_flops = flops(BATCH, R, f, A, train=True)
    eval_flops = {"reference": flops(REF_EVAL_BATCH, R, f, A, False) / REF_EVAL_BATCH}
    eval_flops["project-bf16"] = eval_flops["project-fp32"] = (
        flops(args.eval_batch, R, f, A, False) / args.eval_batch)
    peak_of = {"project-bf16": "bfloat16", "project-fp32": "float32", "reference": "float32"}
    mm_flops = 2.0 * BATCH * R * f * 4 * A
    result = {"regions": R, "channels": f, "attributes": A, "paths": {},
              "matmul_gflops": {k: statistics.median(mm_flops / r["matmul_s"][k] / 1e9 for r in rounds)
                                for k in ("float32", "bfloat16")},
              "foreign_cpu_share": [r["foreign_cpu_share"] for r in rounds],
              "project_vs_reference_first_batch_rel_diff": agreement}
    for name in peak_of:
        def med(fn):
            return statistics.median(fn(r) for r in rounds)
        train_s = med(lambda r: r[name]["train_s_per_step"])
        eval_s = med(lambda r: r[name]["eval_s_per_image"])
        result["paths"][name] = {
            "train_samples_per_s": BATCH / train_s,
            "eval_images_per_s": 1.0 / eval_s,
            "train_gflops": train_flops / train_s / 1e9,
            "eval_gflops": eval_flops[name] / eval_s / 1e9,
            "train_fraction_of_matmul": med(lambda r: train_flops / r[name]["train_s_per_step"]
                                            / (mm_flops / r["matmul_s"][peak_of[name]])),
            "eval_fraction_of_matmul": med(lambda r: eval_flops[name] / r[name]["eval_s_per_image"]
                                           / (mm_flops / r["matmul_s"][peak_of[name]])),
            "train_speedup_vs_reference": med(lambda r: r["reference"]["train_s_per_step"]
                                              / r[name]["train_s_per_step"]),
            "eval_speedup_vs_reference": med(lambda r: r["reference"]["eval_s_per_image"]
                                             / r[name]["eval_s_per_image"]),
            "cub_recipe_minutes": (RECIPE_STEPS * train_s
                                   + RECIPE_EVALS * CUB_TEST_IMAGES * eval_s) / 60,
        }
    result["rounds"] = rounds
    return result


def print_table(results: dict, args) -> None:
    print(f"device {args.device}, {torch.get_num_threads()} thread(s), {args.clock}-clock times, "
          f"batch {BATCH}, project eval batch {args.eval_batch}, {args.rounds} round(s)")
    header = (f"{'grid':>7} {'path':<13} {'train/s':>8} {'eval/s':>8} {'train GF/s':>15} "
              f"{'eval GF/s':>15} {'train x':>7} {'eval x':>7} {'CUB min':>8}")
    print(header)
    print("-" * len(header))
    for grid, res in results.items():
        for name, p in res["paths"].items():
            print(f"{grid:>7} {name:<13} {p['train_samples_per_s']:8.1f} {p['eval_images_per_s']:8.1f} "
                  f"{p['train_gflops']:7.0f} ({p['train_fraction_of_matmul']:4.0%}) "
                  f"{p['eval_gflops']:7.0f} ({p['eval_fraction_of_matmul']:4.0%}) "
                  f"{p['train_speedup_vs_reference']:7.2f} {p['eval_speedup_vs_reference']:7.2f} "
                  f"{p['cub_recipe_minutes']:8.1f}")
        mm = res["matmul_gflops"]
        print(f"{grid:>7} matmul peak: float32 {mm['float32']:.0f} GF/s, bfloat16 {mm['bfloat16']:.0f} "
              f"GF/s; other processes' CPU share per round: "
              f"{[round(x, 2) for x in res['foreign_cpu_share'] if x is not None]}; "
              f"project vs reference scores, first batch: rel. diff "
              f"{res['project_vs_reference_first_batch_rel_diff']:.1e}")
    print("(x = speed-up over the reference within each round, median over rounds; % = achieved"
          " matmul GFLOP/s over torch.mm of the step's GEMM shape in the path's precision;"
          " CUB min = 4,234 steps + 30 evaluations of 4,731 images)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--grids", default="14,7", help="feature grid sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed training steps per round (default: 4 on CPU, 100 on CUDA)")
    parser.add_argument("--eval-images", type=int, default=500, help="images evaluated per round")
    parser.add_argument("--eval-batch", type=int, default=None,
                        help="project's evaluation batch (default: 200 on CPU, where the tail "
                             "stays in cache, 1000 on CUDA)")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="cpu: count this process's CPU time (needs --threads 1 on CPU): "
                             "numbers independent of other processes' load")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--wait-idle", type=float, default=60.0, help="max seconds to wait for a quiet CPU")
    parser.add_argument("--seed", type=int, default=214)
    parser.add_argument("--json", type=Path, default=None, help="default: next to the caches")
    parser.add_argument("--keep-caches", action="store_true")
    # Smaller problems, for the bench's own test only.
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--attributes", type=int, default=312)
    parser.add_argument("--classes", type=int, default=200)
    args = parser.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this torch build")
    device = torch.device(args.device)
    if args.clock == "cpu" and (device.type != "cpu" or args.threads != 1):
        parser.error("--clock cpu measures one CPU thread: use it with --device cpu --threads 1")
    cuda = device.type == "cuda"
    args.steps = args.steps or (100 if cuda else 4)
    args.eval_batch = args.eval_batch or (1000 if cuda else 200)
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="msdn_bench_train_"))
    if device.type == "cpu" and args.wait_idle > 0:
        wait_until_idle(args.wait_idle)
    results = {}
    for grid in (int(g) for g in args.grids.split(",")):
        path = write_cache(workdir / f"cub_like_{grid}x{grid}.h5", args.images, args.channels, grid,
                           args.classes, args.attributes, args.seed)
        results[f"{grid}x{grid}"] = measure_grid(args, path, device)
        if not args.keep_caches:
            path.unlink()
    print_table(results, args)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "args": {k: str(v) for k, v in vars(args).items()}, "grids": results}
    out = args.json or workdir / "bench_train.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"JSON: {out}")
    return report


if __name__ == "__main__":
    main()
