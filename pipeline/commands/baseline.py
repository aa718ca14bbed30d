"""Linear baselines on the same cache, splits, selection and metrics as `msdn train`.

ESZSL (Romera-Paredes & Torr, ICML 2015), in the paper's notation: X (d, n) features, Y (n, z) in
{-1, 1} (1 at the image's class, -1 elsewhere, as the paper states), S (a, z) class attributes of
the z training classes. With the paper's choice beta = gamma * lambda the objective
    ||X^T V S - Y||^2 + gamma ||V S||^2 + lambda ||X^T V||^2 + beta ||V||^2
has the closed form  V = (X X^T + gamma I)^-1 X Y S^T (S S^T + lambda I)^-1  (d, a), and a test
image x scores class c as x^T V s_c. Arrays here hold one image per ROW, i.e. `features` = X^T.

Features are the backbone's maps averaged over the grid (global average pooling), L2-normalised per
image by default (like the heads' region features, docs/method.md); class attributes are the cache's
`att` (rows L2-normalised). The two regularisers are chosen on the validation task (validation
classes play unseen; pipeline/tasks.py) by validation H at its best calibration gamma, then AUSUC;
that calibration gamma is the one applied to the test split, which is evaluated once.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cache.reader import CacheError, FeatureCache
from pipeline.metrics import gzsl_accuracy, gzsl_report, harmonic_mean, scores_of
from pipeline.runlog import RunLog, write_json_atomic
from pipeline.tasks import Task, benchmark_task, usable_splits, validation_task

METHODS = ("eszsl",)
NORMALIZATIONS = ("l2", "none")
REGULARISER_GRID = tuple(10.0 ** k for k in range(-3, 4))  # the paper's grid: 10^b, b = -3..3


def eszsl_solutions(features: np.ndarray, labels: np.ndarray, att: np.ndarray, reg_features, reg_attributes):
    """Yield ((gamma, lambda), V) for every pair of the two regulariser lists.

    `features` (n, d), `labels` (n,) in 0..z-1, `att` (a, z). One eigendecomposition of each Gram
    matrix serves the whole grid: with X X^T = U diag(D) U^T and S S^T = W diag(E) W^T,
    V = U [(U^T X Y S^T W) / ((D + gamma)(E + lambda)^T)] W^T.
    """
    x = np.asarray(features, dtype=np.float64)
    s = np.asarray(att, dtype=np.float64)
    y = -np.ones((len(x), s.shape[1]))
    y[np.arange(len(x)), np.asarray(labels)] = 1.0
    d_eig, u = np.linalg.eigh(x.T @ x)
    e_eig, w = np.linalg.eigh(s @ s.T)
    rotated = u.T @ (x.T @ y @ s.T) @ w
    for gamma in reg_features:
        for lam in reg_attributes:
            yield (float(gamma), float(lam)), u @ (rotated / np.outer(d_eig + gamma, e_eig + lam)) @ w.T


@dataclass
class ESZSL:
    reg_features: float = 1.0    # the paper's gamma
    reg_attributes: float = 1.0  # the paper's lambda

    def fit(self, features: np.ndarray, labels: np.ndarray, att: np.ndarray) -> "ESZSL":
        """`features` (n, d) of training images, `labels` (n,) indexing the columns of `att` (a, z)."""
        _, self.V_ = next(eszsl_solutions(features, labels, att, [self.reg_features], [self.reg_attributes]))
        return self

    def scores(self, features: np.ndarray, att: np.ndarray) -> np.ndarray:
        """(n, C) compatibility x^T V s_c with every class column of `att` (a, C)."""
        return np.asarray(features, dtype=np.float64) @ self.V_ @ np.asarray(att, dtype=np.float64)


def pooled_features(cache: FeatureCache, rows: np.ndarray, normalize: str = "l2", chunk: int = 512) -> np.ndarray:
    """(len(rows), C) float64 global average pooled feature maps, read `chunk` rows at a time."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), cache.feature_shape[0]), dtype=np.float64)
    for start in range(0, len(rows), chunk):
        maps = cache.features(rows=rows[start:start + chunk], dtype=torch.float32)
        out[start:start + len(maps)] = maps.flatten(2).mean(2).double().numpy()
    if normalize == "l2":
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def _task_reports(task: Task, pooled: dict, labels: np.ndarray, att: np.ndarray, grid, *,
                  gamma: float = 0.0, with_curve: bool = False):
    """For each regulariser pair of `grid`: train on the task's seen classes, score its eval rows
    over all its classes, and yield ((gamma, lambda), gzsl_report) (+ "gamma0": U/S/H uncalibrated)."""
    seen_att = att[task.classes[task.seen]].T          # (a, z): the seen classes' columns
    task_att = att[task.classes].T                     # (a, K): every class of the task
    y_train = np.searchsorted(task.seen, task.local_labels(labels[task.train_rows]))
    y_seen = task.local_labels(labels[task.eval_seen_rows])
    y_unseen = task.local_labels(labels[task.eval_unseen_rows])
    for params, V in eszsl_solutions(pooled[task.name]["train"], y_train, seen_att, *grid):
        scores_seen = pooled[task.name]["seen"] @ V @ task_att
        scores_unseen = pooled[task.name]["unseen"] @ V @ task_att
        report = gzsl_report(scores_seen, y_seen, scores_unseen, y_unseen, task.seen, task.unseen,
                             gamma=gamma, with_curve=with_curve)
        u = gzsl_accuracy(scores_unseen, y_unseen, task.seen)
        s = gzsl_accuracy(scores_seen, y_seen, task.seen)
        report["gamma0"] = {"U": u, "S": s, "H": harmonic_mean(u, s)}
        yield params, report


@dataclass
class BaselineConfig:
    method: str = "eszsl"
    normalize: str = "l2"
    grid: tuple[float, ...] = REGULARISER_GRID
    val_seen_fraction: float = 0.2  # as TrainConfig: share of each validation-seen class held out for S
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown baseline method {self.method!r}; available: {', '.join(METHODS)}")


def run_baseline(cache_path: str | Path, out_dir: str | Path, config: BaselineConfig | None = None, *,
                 overwrite: bool = False) -> dict:
    """Select the regularisers and calibration gamma on validation, fit on trainval, evaluate the
    test split once; write config.json, metrics.jsonl (the validation grid), curve.json and
    summary.json into `out_dir`; return the summary (same keys as `msdn train`'s where they apply)."""
    config = config or BaselineConfig()
    cache_path, out_dir = Path(cache_path), Path(out_dir)
    seconds = {}
    with FeatureCache(cache_path) as cache:
        labels = np.asarray(cache.labels)
        splits, skipped = usable_splits(cache)
        att = np.asarray(cache.att, dtype=np.float64)
        test = benchmark_task(labels, splits, num_classes=att.shape[0])
        try:
            val = validation_task(labels, splits, held_out_fraction=config.val_seen_fraction, seed=config.seed)
        except ValueError as err:
            raise CacheError(f"{cache_path}: {err}") from None
        run = RunLog(out_dir, overwrite=overwrite)
        run.write_config({**asdict(config), "run": {"cache": str(cache_path), "skipped_rows_dropped": skipped,
                                                    "tasks": [val.describe(), test.describe()]}})
        start = time.perf_counter()
        pooled = {t.name: {part: pooled_features(cache, rows, config.normalize) for part, rows in
                           (("train", t.train_rows), ("seen", t.eval_seen_rows), ("unseen", t.eval_unseen_rows))}
                  for t in (val, test)}
        seconds["pool_features"] = time.perf_counter() - start

    start = time.perf_counter()
    history = []
    for (g, l), report in _task_reports(val, pooled, labels, att, (config.grid, config.grid)):
        record = {"phase": "val", "reg_features": g, "reg_attributes": l, **report}
        run.log(record)
        history.append(record)
    chosen = max(history, key=lambda r: (round(r["best"]["H"], 6), round(r["AUSUC"], 6), r["ZSL"]))
    seconds["select"] = time.perf_counter() - start

    start = time.perf_counter()
    regs = [chosen["reg_features"]], [chosen["reg_attributes"]]
    gamma = chosen["best"]["gamma"]
    (_, report), = _task_reports(test, pooled, labels, att, regs, gamma=gamma, with_curve=True)
    seconds["fit_and_test"] = time.perf_counter() - start
    write_json_atomic(run.dir / "curve.json", {"split": "test", **report.pop("curve")})
    run.log({"phase": "test", "reg_features": regs[0][0], "reg_attributes": regs[1][0], **report})

    summary = {
        "method": config.method, "cache": str(cache_path), "normalize": config.normalize,
        "protocol": "regularisers and calibration gamma selected on validation classes; test evaluated once",
        "selection": {"mode": "val", "reg_features": regs[0][0], "reg_attributes": regs[1][0], "gamma": gamma,
                      "validation": {k: chosen[k] for k in ("ZSL", "AUSUC", "best")}, "task": val.describe()},
        "test": scores_of(report),  # no test-chosen gamma: curve.json holds the test curve
        "test_gamma0": report["gamma0"],
        "timing": seconds,
    }
    run.write_summary(summary)
    return summary



def baseline_rows(summary: dict) -> dict[str, dict]:
    """Named result rows for the printed table (pipeline/runlog.py format_table)."""
    v = summary["selection"]["validation"]
    return {"validation (selected)": {"ZSL": v["ZSL"], "AUSUC": v["AUSUC"], **v["best"]},
            "test": summary["test"],
            "test, gamma=0 (uncalibrated)": {**summary["test_gamma0"], "gamma": 0.0}}
