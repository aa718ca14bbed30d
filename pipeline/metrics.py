"""ZSL / GZSL metrics (docs/method.md): per-class accuracy, calibrated stacking, seen-unseen curve, AUSUC.

Scores are (N, C) over the model's whole class axis; `seen` / `unseen` are class indices into it.
Accuracies are fractions in [0, 1]. Everything accepts torch tensors (any device) or numpy arrays;
the curve is computed in float64 numpy because it only needs O(N) numbers per image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# The scores every run reports, in the order every table shows them: ZSL, GZSL U/S/H and AUSUC are
# fractions in results (percent in tables); gamma is the calibration the run chose.
SCORES = ("ZSL", "U", "S", "H", "AUSUC")
SCORES_AND_GAMMA = SCORES + ("gamma",)


def scores_of(report: dict) -> dict:
    """The SCORES_AND_GAMMA entries of an evaluation report (what summaries record)."""
    return {k: report[k] for k in SCORES_AND_GAMMA if k in report}


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def per_class_accuracy(pred, labels, classes=None) -> float:
    """Top-1 accuracy of each true class, averaged over classes (default: the classes in `labels`).

    Classes without any image are skipped: their accuracy is undefined, and counting them as 0
    (or NaN, as the released code does) would make the number depend on the candidate list.
    """
    pred, labels = _np(pred).astype(np.int64), _np(labels).astype(np.int64)
    classes = np.unique(labels) if classes is None else np.unique(_np(classes))
    n = int(max(labels.max(initial=0), classes.max(initial=0))) + 1
    total = np.bincount(labels, minlength=n)[classes]
    correct = np.bincount(labels[pred == labels], minlength=n)[classes]
    present = total > 0
    if not present.any():
        raise ValueError("per_class_accuracy: none of the classes has an image")
    return float(np.mean(correct[present] / total[present]))


def harmonic_mean(unseen_acc: float, seen_acc: float) -> float:
    total = unseen_acc + seen_acc
    return 0.0 if total <= 0 else 2.0 * unseen_acc * seen_acc / total


def calibrated_stacking(scores, seen, gamma: float) -> torch.Tensor:
    """Scores with `gamma` subtracted from every seen-class column (Chao et al. 2016)."""
    scores = _tensor(scores).clone()
    scores[:, _tensor(seen).to(scores.device).long()] -= gamma
    return scores


def zsl_accuracy(scores, labels, unseen) -> float:
    """Conventional ZSL: test_unseen images, candidates = unseen classes only."""
    scores = _tensor(scores)
    unseen = torch.unique(_tensor(unseen).to(scores.device).long())  # sorted: ties -> lowest class id
    pred = unseen[scores[:, unseen].argmax(dim=1)]
    return per_class_accuracy(pred, labels)


def gzsl_accuracy(scores, labels, seen, gamma: float = 0.0) -> float:
    """GZSL per-class accuracy of `labels`' classes, candidates = all classes, seen scores - gamma."""
    pred = calibrated_stacking(scores, seen, gamma).argmax(dim=1)
    return per_class_accuracy(pred, labels)


@dataclass
class SeenUnseenCurve:
    """Exact seen/unseen accuracy trade-off as gamma sweeps from -inf to +inf.

    Point j holds for every gamma in an open interval between two consecutive breakpoints;
    `gammas[j]` is a representative gamma inside it (midpoint; ends pushed 1 beyond the extremes),
    so `gzsl_accuracy(..., gamma=gammas[j])` reproduces (seen_acc[j], unseen_acc[j]) exactly.
    """

    gammas: np.ndarray
    seen_acc: np.ndarray    # decreasing from the seen-only accuracy to 0
    unseen_acc: np.ndarray  # increasing from 0 to the ZSL accuracy

    @property
    def harmonic(self) -> np.ndarray:
        total = self.seen_acc + self.unseen_acc
        return np.where(total > 0, 2 * self.seen_acc * self.unseen_acc / np.maximum(total, 1e-300), 0.0)

    @property
    def ausuc(self) -> float:
        """Area under the curve, unseen accuracy (y) against seen accuracy (x), trapezoids."""
        dx = -np.diff(self.seen_acc)
        return float(np.sum(dx * (self.unseen_acc[1:] + self.unseen_acc[:-1]) / 2))

    def best(self) -> dict:
        """The point of highest H: {"gamma", "U", "S", "H"}; ties go to the smallest |gamma|."""
        h = self.harmonic
        candidates = np.flatnonzero(h == h.max())
        j = candidates[np.argmin(np.abs(self.gammas[candidates]))]
        return {"gamma": float(self.gammas[j]), "U": float(self.unseen_acc[j]),
                "S": float(self.seen_acc[j]), "H": float(h[j])}

    def to_dict(self) -> dict:
        return {"gamma": self.gammas.tolist(), "S": self.seen_acc.tolist(), "U": self.unseen_acc.tolist()}


def seen_unseen_curve(scores_seen, labels_seen, scores_unseen, labels_unseen, seen, unseen) -> SeenUnseenCurve:
    """Sweep gamma over every breakpoint: an image switches from its best seen class to its best
    unseen class exactly when gamma passes (best seen score - best unseen score), so the per-class
    accuracies are step functions of gamma with at most N steps."""
    # sorted, so that "first maximum" ties break as torch.argmax over the full class axis does
    seen, unseen = np.unique(_np(seen).astype(np.int64)), np.unique(_np(unseen).astype(np.int64))
    parts = []
    for scores, labels, is_seen_split in ((scores_seen, labels_seen, True), (scores_unseen, labels_unseen, False)):
        s, y = _np(scores).astype(np.float64), _np(labels).astype(np.int64)
        best_seen = seen[s[:, seen].argmax(1)]
        best_unseen = unseen[s[:, unseen].argmax(1)]
        margin = s[:, seen].max(1) - s[:, unseen].max(1)
        _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
        weight = 1.0 / (counts[inverse] * len(counts))  # each class weighs 1/num_classes in total
        hit = (best_seen == y) if is_seen_split else (best_unseen == y)
        gain = weight * hit
        parts.append((margin, gain if is_seen_split else 0 * gain, 0 * gain if is_seen_split else gain))
    margin = np.concatenate([p[0] for p in parts])
    lose_seen = np.concatenate([p[1] for p in parts])
    gain_unseen = np.concatenate([p[2] for p in parts])

    breaks, inverse = np.unique(margin, return_inverse=True)
    seen_drop = np.bincount(inverse, weights=lose_seen, minlength=len(breaks))
    unseen_rise = np.bincount(inverse, weights=gain_unseen, minlength=len(breaks))
    seen_acc = np.concatenate([[lose_seen.sum()], lose_seen.sum() - np.cumsum(seen_drop)])
    unseen_acc = np.concatenate([[0.0], np.cumsum(unseen_rise)])
    seen_acc[-1] = 0.0  # exact end points despite float cumsum
    gammas = np.concatenate([[breaks[0] - 1.0], (breaks[:-1] + breaks[1:]) / 2, [breaks[-1] + 1.0]])
    return SeenUnseenCurve(gammas, np.maximum(seen_acc, 0.0), unseen_acc)


def gzsl_report(scores_seen, labels_seen, scores_unseen, labels_unseen, seen, unseen, gamma: float = 0.0,
                with_curve: bool = False) -> dict:
    """ZSL, GZSL U/S/H at `gamma`, AUSUC and the curve's best-H point ("best": gamma, U, S, H) for
    one set of test (or validation) scores; "curve" too when asked."""
    u = gzsl_accuracy(scores_unseen, labels_unseen, seen, gamma)
    s = gzsl_accuracy(scores_seen, labels_seen, seen, gamma)
    curve = seen_unseen_curve(scores_seen, labels_seen, scores_unseen, labels_unseen, seen, unseen)
    report = {"ZSL": zsl_accuracy(scores_unseen, labels_unseen, unseen), "U": u, "S": s,
              "H": harmonic_mean(u, s), "gamma": float(gamma), "AUSUC": curve.ausuc, "best": curve.best()}
    if with_curve:
        report["curve"] = curve.to_dict()
    return report
