"""Which images train a model, which evaluate it, and which classes it knows.

`benchmark_task`: the benchmark itself (train on trainval, evaluate on test_seen / test_unseen
over all classes). `validation_task`: the same problem one level down, built only from trainval images, so
that choosing gamma and the iteration count never looks at a test image: validation classes
(xlsa17 val_loc) play unseen, the remaining trainval classes play seen, and a fixed share of each
seen class's images is held out to measure S. xlsa17's train_loc/val_loc also index test_seen
images (e.g. SUN: 2,320 of train_loc's 11,600), so both are intersected with trainval_loc first.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cache.layout import make_validation_split
from cache.reader import CacheError


@dataclass
class Task:
    name: str                    # "test" or "val"
    classes: np.ndarray          # global class ids on the model's class axis, in order (K,)
    seen: np.ndarray             # local class ids (positions in `classes`) the model trains on
    unseen: np.ndarray           # local class ids it never sees an image of
    train_rows: np.ndarray       # cache rows
    eval_seen_rows: np.ndarray
    eval_unseen_rows: np.ndarray
    note: str = ""

    def local_labels(self, global_labels: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.classes, global_labels)

    def rows(self) -> np.ndarray:
        """Every cache row the task reads (training, then seen and unseen evaluation)."""
        return np.concatenate([self.train_rows, self.eval_seen_rows, self.eval_unseen_rows])

    def describe(self) -> dict:
        return {"name": self.name, "classes": len(self.classes), "seen": len(self.seen),
                "unseen": len(self.unseen), "train_images": len(self.train_rows),
                "eval_seen_images": len(self.eval_seen_rows), "eval_unseen_images": len(self.eval_unseen_rows),
                "note": self.note}


def usable_splits(cache) -> tuple[dict, int]:
    """The cache's splits without rows whose image was skipped as unreadable (their features are
    zeros), and how many such rows were dropped. An unfinished extraction is refused."""
    unfinished = ~cache.done & ~cache.skipped
    if unfinished.any():
        raise CacheError(f"{cache.path}: {int(unfinished.sum())} rows are not extracted yet; finish the "
                         "extraction with `msdn extract --resume` first")
    return cache.done_splits(), int(cache.skipped.sum())


def benchmark_task(labels: np.ndarray, splits: dict, num_classes: int) -> Task:
    seen = np.unique(labels[splits["trainval_loc"]])
    unseen = np.unique(labels[splits["test_unseen_loc"]])
    if np.intersect1d(seen, unseen).size:
        raise CacheError(f"classes {np.intersect1d(seen, unseen)[:10].tolist()} are both seen (trainval_loc) and "
                         "unseen (test_unseen_loc); zero-shot splits must keep them apart")
    return Task("test", np.arange(num_classes), seen, unseen, np.sort(splits["trainval_loc"]),
                np.sort(splits["test_seen_loc"]), np.sort(splits["test_unseen_loc"]),
                note="xlsa17 trainval -> test_seen / test_unseen")


def validation_task(labels: np.ndarray, splits: dict, *, held_out_fraction: float = 0.2, seed: int = 0) -> Task:
    trainval = np.sort(splits["trainval_loc"])
    if "train_loc" in splits and "val_loc" in splits:
        train_loc = np.intersect1d(splits["train_loc"], trainval)
        val_loc = np.intersect1d(splits["val_loc"], trainval)
        note = "split: the cache's own train_loc/val_loc (xlsa17's for its benchmarks), within trainval"
    else:  # e.g. a TransZero-written cache: hold out a fixed fifth of the seen classes
        train_loc, val_loc = make_validation_split(labels, trainval, fraction=0.2, seed=0)
        note = ("split: derived, 20% of the seen classes picked as validation classes (seed 0), because the "
                "cache has no train_loc/val_loc (a TransZero-written file?); xlsa17's own split differs")
    pseudo_seen = np.unique(labels[train_loc])
    pseudo_unseen = np.unique(labels[val_loc])
    if len(pseudo_seen) == 0 or len(pseudo_unseen) == 0 or np.intersect1d(pseudo_seen, pseudo_unseen).size:
        raise ValueError("validation split: train_loc and val_loc must hold disjoint, non-empty sets of "
                         "trainval classes")
    fit_rows, held_out = _hold_out_per_class(train_loc, labels, held_out_fraction, seed)
    classes = np.union1d(pseudo_seen, pseudo_unseen)
    return Task("val", classes, np.searchsorted(classes, pseudo_seen), np.searchsorted(classes, pseudo_unseen),
                fit_rows, held_out, np.sort(val_loc),
                note=f"{note}; {held_out_fraction:.0%} of each seen class's images held out for S")


def _hold_out_per_class(rows: np.ndarray, labels: np.ndarray, fraction: float, seed: int):
    """Split rows per class: round(fraction * n) images (at least one, when a class has two or
    more) are held out; the choice is fixed by `seed`."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels[rows]):
        members = rng.permutation(rows[labels[rows] == c])
        n_out = min(max(1, round(fraction * len(members))), len(members) - 1)
        held.append(members[:n_out])
        keep.append(members[n_out:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))
