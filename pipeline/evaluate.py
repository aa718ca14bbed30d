"""`msdn evaluate`: score a checkpoint on the test split of the cache it was trained on."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from cache.reader import FeatureCache
from extract.devices import resolve_device
from heads.config import HeadConfig
from heads.runtime import keep_freed_memory
from pipeline.checkpoint import cache_identity, check_compatible, load_checkpoint, load_weights
from pipeline.config import TrainConfig
from pipeline.engine import DivergedError, build_model, evaluate_task, resolve_amp
from pipeline.features import bank_dtype
from pipeline.memory import describe_plan, memory_plan, open_store
from pipeline.metrics import scores_of
from pipeline.run_cache import find_cache
from pipeline.runlog import RunLog, write_json_atomic
from pipeline.tasks import benchmark_task, usable_splits


def evaluate(checkpoint: str | Path, cache_path: str | Path | None = None, *, cache_dir: str | None = None,
             out_dir: str | Path | None = None,
             device: str = "auto", gamma: float | None = None, amp: str | None = None,
             batch_size: int | None = None, overwrite: bool = False, max_memory: str | None = None,
             trust_unverified: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """ZSL, U/S/H at the checkpoint's gamma (or `gamma`) and AUSUC; no test-chosen gamma (with
    `out_dir` the whole test curve goes to curve.json). Refuses a cache whose content key or class
    split differs from the training cache.
    `cache_path` None: the run's cache (pipeline/run_cache.py: config.json's, else by key in the store).
    With `out_dir`, writes config.json, metrics.jsonl, summary.json and curve.json there."""
    checkpoint, device = Path(checkpoint), resolve_device(device)
    ckpt = load_checkpoint(checkpoint, trust_unverified=trust_unverified)
    cache_path = Path(cache_path) if cache_path is not None else find_cache(checkpoint, ckpt, None, cache_dir)
    config = TrainConfig.from_dict(ckpt["config"], where=f"{checkpoint} (embedded config)")
    gamma = ckpt["gamma"] if gamma is None else float(gamma)
    amp = resolve_amp(amp or config.amp, device)
    keep_freed_memory(True)  # evaluation's large temporaries reuse mapped memory (heads/runtime.py)
    batch_size = batch_size or config.eval_batch_size
    with FeatureCache(cache_path) as cache:
        identity = cache_identity(cache)
        check_compatible(ckpt, identity, checkpoint, cache_path)
        labels = np.asarray(cache.labels)
        task = benchmark_task(labels, usable_splits(cache)[0], num_classes=identity["num_classes"])
        model = build_model(HeadConfig.from_dict(ckpt["config"]["head"]), cache, task, device, config.seed)
        load_weights(model, ckpt, checkpoint)
        rows, dtype = np.concatenate([task.eval_seen_rows, task.eval_unseen_rows]), bank_dtype(config.feature_dtype, amp)
        plan = memory_plan(cache, rows, device, dtype, max_memory=max_memory, batch_size=1,  # no training step
                           eval_batch_size=batch_size, num_attributes=int(cache.att.shape[1]))
        # after every refusal, so that --overwrite keeps an earlier evaluation until this one can run
        run = RunLog(out_dir, overwrite=overwrite) if out_dir is not None else None
        (log or (lambda message: None))(describe_plan(plan))
        store = open_store(cache, rows, device, dtype, plan, batch_size=1, eval_batch_size=batch_size)
        try:
            report = evaluate_task(model, store, task, labels, gamma=gamma, batch_size=batch_size, amp=amp,
                                   with_curve=True)
        except DivergedError as err:
            raise DivergedError(f"{checkpoint}: {err}: its weights hold NaN or inf (a diverged or damaged "
                                "checkpoint)") from None
    curve = report.pop("curve")
    summary = {"checkpoint": str(checkpoint), "cache": str(cache_path), "content_key": identity["content_key"],
               "iteration": ckpt["iteration"], "device": str(device), "amp": amp,
               "test": scores_of(report),
               "test_gamma0": report.get("gamma0", {k: report[k] for k in ("U", "S", "H")}),
               "recorded_at_training": ckpt["metrics"]}
    if run is not None:
        run.write_config({"checkpoint": str(checkpoint), "cache": str(cache_path), "gamma": gamma,
                          "amp": amp, "device": str(device), "features": plan,
                          "train_config": ckpt["config"]})
        run.log({"phase": "test", "step": ckpt["iteration"], **report})
        write_json_atomic(run.dir / "curve.json", {"split": "test", "step": ckpt["iteration"], **curve})
        run.write_summary(summary)
    return summary


def evaluation_rows(summary: dict) -> dict[str, dict]:
    return {"test": summary["test"], "test, gamma=0 (bias only)": {**summary["test_gamma0"], "gamma": 0.0}}
