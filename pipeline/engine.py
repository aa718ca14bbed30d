"""The training loop and the scorer: what `pipeline/train.py` and `pipeline/evaluate.py` run.

The loop never waits for the device inside a step: batches are sampled where the features live
(a ResidentFeatures's RegionBank: one row gather per batch), losses accumulate on the device, and the
host reads them back only every `log_every` steps.

A non-finite loss stops training (DivergedError) without a host synchronisation per step on a GPU:
each step's loss terms go into a small device buffer (log_every rows, in place of a running sum),
and at each logging point, which precedes every evaluation, the one read-back that already
happened there also says which rows are finite; the first that is not names the step. On the CPU,
where reading a value back costs nothing, every step is checked and training stops at once.
Non-finite class scores at an evaluation stop it too. The cached features themselves are checked
once, when they are loaded (pipeline/features.py), so a divergence here points at the optimiser.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Callable

import numpy as np
import torch

from cache.errors import UserError
from extract.progress import progress_bar
from heads.msdn import MSDN
from heads.regions import Regions
from pipeline.features import FlippedDraw, ResidentFeatures
from pipeline.metrics import gzsl_accuracy, gzsl_report, harmonic_mean
from pipeline.precision import choose_amp
from pipeline.samplers import build_sampler
from pipeline.tasks import Task

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Host memory one evaluation batch may take (its gathered regions and the head's activations).
# At the recipes' eval_batch_size of 1024 CUB images the batch alone is ~3 GB, twice a 2,000-image
# bank: on the host the evaluation batch, not the bank, set the run's peak. ~100 images a batch
# keep the GEMMs just as efficient.
EVAL_HOST_BYTES = 256 << 20

# Device types whose every step is checked for a non-finite loss: a read-back is free on the CPU;
# on a GPU it would stall the queue, so there the check waits for the next logging point.
CHECK_EACH_STEP_ON = ("cpu",)


class DivergedError(UserError, RuntimeError):
    """Training met a non-finite loss or score; the message names the step, the loss terms and
    the likely cause. Nothing is recorded as a result (no summary.json)."""


FLIP_SEED_OFFSET = 7919  # flip coins: a stream apart from the sampler's (seeded with config.seed)


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
        desc: str = "train", progress: bool = True, on_log: Callable[[int, dict], None] | None = None) -> dict:
    """Train `model` for `steps` RMSprop steps on the given rows; call `on_eval(step, losses)` every
    `eval_every` steps (and at the last; a true return value stops training there: early stopping),
    and `on_log(step, values)` at every host read-back
    (every `log_every` steps: the interval's mean loss terms and "samples_per_s"; nothing is read
    back for it). Progress: a bar on a terminal, plain lines in a log (extract/progress.py).
    Returns {"steps", "seconds" (training only), "eval_seconds", "cpu_seconds" (training only; the
    CPU time a shared machine does not distort), "samples_per_s", "loss" (mean of the last logging
    interval)}."""
    device = store.device
    positions = store.positions(train_rows)
    labels_idx = torch.as_tensor(train_labels, dtype=torch.long, device=store.index_device)
    sampler = build_sampler(config.sampler, labels_idx, config.batch_size, config.seed)
    if config.flip > 0:  # the one place a training sample turns into its flipped image's map
        # its own generator: the sampler's batches stay those of flip = 0 (runs of one seed stay paired)
        coins = torch.Generator(device=labels_idx.device)
        coins.manual_seed(config.seed + FLIP_SEED_OFFSET)
        positions = FlippedDraw(positions, store.flipped_positions(train_rows), config.flip, coins)
    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    check_each_step = device.type in CHECK_EACH_STEP_ON
    history, n_running, last, stop = None, 0, {}, False
    samples, total_samples, eval_seconds, clock = 0, 0, 0.0, time.perf_counter()
    start, start_cpu, eval_cpu = clock, time.process_time(), 0.0  # CPU: all threads, a streaming reader's too
    bar = progress_bar(steps, desc, unit="steps", enabled=progress, dynamic_ncols=True, leave=False)
    # closed on the way out, so a streaming store's reading thread stops with the loop
    with contextlib.closing(store.training_batches(positions, sampler, steps, config.batch_size)) as batches:
        for step, (picked, features) in enumerate(batches, start=1):
            model.train()
            labels = labels_idx[picked].to(device, non_blocking=True)
            # 0 while lambda_causal = 0 or during the causal warm-up: exactly MSDN, no counterfactual work
            causal_scale = config.head.causal_scale(step)
            losses = train_step(model, optimizer, scaler, features, labels, amp=amp, causal_scale=causal_scale)
            terms = torch.stack([v.detach().float() for v in losses.values()])
            if history is None or history.shape[1] != len(terms):  # first step; causal terms after a warm-up
                history, n_running = terms.new_empty((config.log_every, len(terms))), 0
            history[n_running] = terms
            n_running += 1
            samples += len(picked)
            total_samples += len(picked)
            if check_each_step and not bool(torch.isfinite(terms).all()):
                raise _diverged(desc, step, steps, losses.keys(), terms.tolist(), config, amp)
            if step % config.log_every == 0 or step == steps or (eval_every and step % eval_every == 0):
                window = history[:n_running]
                # the loop's only host synchronisation: the interval's mean loss terms, and which
                # steps were finite
                read = torch.cat([window.mean(0), torch.isfinite(window).all(1).float()]).tolist()
                values, finite = read[:len(terms)], read[len(terms):]
                if not all(finite):
                    first = finite.index(0.0)
                    raise _diverged(desc, step - n_running + 1 + first, steps, losses.keys(), window[first].tolist(),
                                    config, amp)
                now = time.perf_counter()
                last = {k: float(v) for k, v in zip(losses.keys(), values)}
                last["samples_per_s"] = samples / max(now - clock, 1e-9)
                bar.set_postfix({"loss": f"{last['loss']:.3f}", "samples/s": f"{last['samples_per_s']:.0f}"})
                if on_log is not None:
                    on_log(step, dict(last))
                n_running, samples, clock = 0, 0, now
            bar.update(1)
            if on_eval is not None and eval_every and (step % eval_every == 0 or step == steps):
                eval_start, eval_start_cpu = time.perf_counter(), time.process_time()
                try:
                    stop = bool(on_eval(step, dict(last)))
                except DivergedError as err:  # non-finite scores (evaluate_task)
                    raise DivergedError(f"{desc}: step {step} of {steps}: {err}; likely cause: "
                                        f"{likely_cause(config, amp)}") from None
                clock = time.perf_counter()  # evaluation time does not count as training time
                eval_seconds += clock - eval_start
                eval_cpu += time.process_time() - eval_start_cpu
                if stop:
                    steps = step
                    break
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


def _diverged(desc: str, step: int, steps: int, names, values, config, amp: str) -> DivergedError:
    terms = ", ".join(f"{name}={value:.4g}" for name, value in zip(names, values))
    return DivergedError(f"{desc}: non-finite loss at step {step} of {steps} ({terms}); likely cause: "
                         f"{likely_cause(config, amp)}")


def likely_cause(config, amp: str) -> str:
    """What to change when training diverges on features already checked to be finite."""
    cause = (f"the learning rate lr={config.lr:g} is too large for these features (RMSprop with alpha="
             f"{config.alpha:g}, momentum={config.momentum:g}): lower it (--set lr=<smaller>)")
    if amp == "fp16":
        cause += "; or float16 autocast overflowed (--set amp=bf16 or amp=none)"
    return cause + "; nothing was recorded as a result (no summary.json)"


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
    for kind, scores in (("seen", scores_seen), ("unseen", scores_unseen)):
        bad = int((~torch.isfinite(scores).all(1)).sum())
        if bad:
            raise DivergedError(f"non-finite class scores for {bad} of {len(scores)} {kind}-class images "
                                f"of the {task.name} split")
    y_seen = task.local_labels(labels[task.eval_seen_rows])
    y_unseen = task.local_labels(labels[task.eval_unseen_rows])
    report = gzsl_report(scores_seen, y_seen, scores_unseen, y_unseen, task.seen, task.unseen, gamma,
                         with_curve=with_curve)
    if gamma != 0.0:  # the heads' fixed +-bias alone, as the released evaluation
        u, s = gzsl_accuracy(scores_unseen, y_unseen, task.seen), gzsl_accuracy(scores_seen, y_seen, task.seen)
        report["gamma0"] = {"U": u, "S": s, "H": harmonic_mean(u, s)}
    return report
