"""The training loop and the scorer: what `pipeline/train.py` and `pipeline/evaluate.py` run.

The loop never waits for the device inside a step: batches are sampled where the features live
(a ResidentFeatures's RegionBank: one row gather per batch), losses accumulate on the device, and the
host reads them back only every `log_every` steps.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from heads.msdn import MSDN
from heads.regions import Regions
from pipeline.precision import choose_amp
from pipeline.metrics import gzsl_accuracy, gzsl_report, harmonic_mean
from pipeline.samplers import build_sampler
from pipeline.resident import ResidentFeatures
from pipeline.tasks import Task

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Host memory one evaluation batch may take (its gathered regions and the head's activations).
# At the recipes' eval_batch_size of 1024 CUB images the batch alone is ~3 GB, twice a 2,000-image
# bank: on the host the evaluation batch, not the bank, set the run's peak. ~100 images a batch
# keep the GEMMs just as efficient.
EVAL_HOST_BYTES = 256 << 20


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_amp(amp: str, device: torch.device) -> str:
    """The autocast precision a run on `device` uses for config amp = `amp` (pipeline/precision.py
    says why; it warns when bf16 is asked on a CPU without native bf16)."""
    return choose_amp(amp, device).amp


def autocast(amp: str, device: torch.device):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


@contextlib.contextmanager
def deterministic_mode(enabled: bool):
    """torch.use_deterministic_algorithms for the duration (restored afterwards)."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]


def build_model(head_config, cache, task: Task, device: torch.device, seed: int) -> MSDN:
    """MSDN over the task's classes (a validation model never knows the test classes)."""
    torch.manual_seed(seed)  # parameter initialisation (W_1 ~ N(0, 1), random V) is part of the seed
    att = torch.from_numpy(np.asarray(cache.att)[task.classes]).float()
    w2v = None if cache.w2v_att is None else torch.from_numpy(np.asarray(cache.w2v_att)).float()
    model = MSDN(head_config, att, w2v, torch.as_tensor(task.seen, dtype=torch.long),
                 torch.as_tensor(task.unseen, dtype=torch.long), feature_dim=int(cache.feature_shape[0]))
    return model.to(device)


def build_optimizer(model: torch.nn.Module, config) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.RMSprop(params, lr=config.lr, weight_decay=config.weight_decay,
                               momentum=config.momentum, alpha=config.alpha, eps=config.eps)


def train_step(model: MSDN, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, features: Regions,
               labels: torch.Tensor, *, amp: str, causal_scale: float) -> dict[str, torch.Tensor]:
    """One optimiser step on one batch; returns the loss terms (on the device, not synchronised).
    causal_scale: the share of the causal weight in force (0 skips the counterfactual branch)."""
    with autocast(amp, features.rows.device):
        out = model(features, counterfactual=causal_scale > 0)
        losses = model.loss(out, labels, causal_scale=causal_scale)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    return losses


def fit(model: MSDN, store: ResidentFeatures, train_rows: np.ndarray, train_labels: np.ndarray, config, *,
        steps: int, amp: str, on_eval: Callable[[int, dict], None] | None = None, eval_every: int | None = None,
        desc: str = "train", progress: bool = True) -> dict:
    """Train `model` for `steps` RMSprop steps on the given rows; call `on_eval(step, losses)` every
    `eval_every` steps (and at the last). Returns {"steps", "seconds" (training only),
    "eval_seconds", "cpu_seconds" (training only; the CPU time a shared machine does not distort), "samples_per_s", "loss" (mean of the last logging interval)}."""
    device = store.device
    positions = store.positions(train_rows)
    labels_idx = torch.as_tensor(train_labels, dtype=torch.long, device=store.index_device)
    sampler = build_sampler(config.sampler, labels_idx, config.batch_size, config.seed)
    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    running, n_running, last = None, 0, {}
    samples, total_samples, eval_seconds, clock = 0, 0, 0.0, time.perf_counter()
    start, start_cpu, eval_cpu = clock, time.process_time(), 0.0  # CPU: all threads, a streaming reader's too
    bar = tqdm(total=steps, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    # closed on the way out, so a streaming store's reading thread stops with the loop
    with contextlib.closing(store.training_batches(positions, sampler, steps, config.batch_size)) as batches:
        for step, (picked, features) in enumerate(batches, start=1):
            model.train()
            labels = labels_idx[picked].to(device, non_blocking=True)
            # 0 while lambda_causal = 0 or during the causal warm-up: exactly MSDN, no counterfactual work
            causal_scale = config.head.causal_scale(step)
            losses = train_step(model, optimizer, scaler, features, labels, amp=amp, causal_scale=causal_scale)
            terms = torch.stack([v.detach().float() for v in losses.values()])
            if running is not None and len(losses) != len(running):  # the causal terms start after a warm-up
                running, n_running = None, 0
            running = terms if running is None else running + terms
            n_running += 1
            samples += len(picked)
            total_samples += len(picked)
            if step % config.log_every == 0 or step == steps or (eval_every and step % eval_every == 0):
                values = (running / n_running).tolist()  # the loop's only host synchronisation
                now = time.perf_counter()
                last = {k: float(v) for k, v in zip(losses.keys(), values)}
                last["samples_per_s"] = samples / max(now - clock, 1e-9)
                bar.set_postfix(loss=f"{last['loss']:.3f}", samples_s=f"{last['samples_per_s']:.0f}")
                running, n_running, samples, clock = None, 0, 0, now
            bar.update(1)
            if on_eval is not None and eval_every and (step % eval_every == 0 or step == steps):
                eval_start, eval_start_cpu = time.perf_counter(), time.process_time()
                on_eval(step, dict(last))
                clock = time.perf_counter()  # evaluation time does not count as training time
                eval_seconds += clock - eval_start
                eval_cpu += time.process_time() - eval_start_cpu
    bar.close()
    seconds = time.perf_counter() - start - eval_seconds
    return {"steps": steps, "seconds": seconds, "eval_seconds": eval_seconds,
            "cpu_seconds": time.process_time() - start_cpu - eval_cpu,
            "samples_per_s": total_samples / max(seconds, 1e-9), "loss": last.get("loss")}


def evaluation_batch_size(store, num_attributes: int, batch_size: int) -> int:
    """`batch_size`, cut on the host to what fits EVAL_HOST_BYTES: per region the gathered row and
    about two float32 copies of the head's (4 x attributes) projection (the projection itself,
    then the softmaxes and their products). A GPU keeps the full batch (device memory is its own)."""
    if store.device.type != "cpu":
        return batch_size
    per_image = store.num_regions * (store.feature_dim * store.dtype.itemsize + 2 * 4 * num_attributes * 4)
    return max(1, min(batch_size, EVAL_HOST_BYTES // per_image))


@torch.inference_mode()
def predict_scores(model: MSDN, store: ResidentFeatures, rows: np.ndarray, *, batch_size: int, amp: str) -> torch.Tensor:
    """Fused, biased class scores (N, K) in float32 for the cache rows, in large no-grad batches
    (on the host no larger than `evaluation_batch_size` allows)."""
    model.eval()
    chunks = []
    batch_size = evaluation_batch_size(store, model.num_attributes, batch_size)
    for features in store.batches(store.positions(rows), batch_size):
        with autocast(amp, store.device):
            chunks.append(model.fused_scores(model(features)).float())
    return torch.cat(chunks)


def evaluate_task(model: MSDN, store: ResidentFeatures, task: Task, labels: np.ndarray, *, gamma: float,
                  batch_size: int, amp: str, with_curve: bool = False) -> dict:
    """ZSL, U/S/H at `gamma`, AUSUC, and the best-H point of the exact seen-unseen curve."""
    scores_seen = predict_scores(model, store, task.eval_seen_rows, batch_size=batch_size, amp=amp)
    scores_unseen = predict_scores(model, store, task.eval_unseen_rows, batch_size=batch_size, amp=amp)
    y_seen = task.local_labels(labels[task.eval_seen_rows])
    y_unseen = task.local_labels(labels[task.eval_unseen_rows])
    report = gzsl_report(scores_seen, y_seen, scores_unseen, y_unseen, task.seen, task.unseen, gamma,
                         with_curve=with_curve)
    if gamma != 0.0:  # the heads' fixed +-bias alone, as the released evaluation
        u, s = gzsl_accuracy(scores_unseen, y_unseen, task.seen), gzsl_accuracy(scores_seen, y_seen, task.seen)
        report["gamma0"] = {"U": u, "S": s, "H": harmonic_mean(u, s)}
    return report
