"""Deterministic ZSL split helpers for adapters whose files give only a class-level split."""
from __future__ import annotations

import numpy as np


def split_seen_images(labels: np.ndarray, seen_classes, test_fraction: float = 0.2,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split the images of each seen class into (trainval_loc, test_seen_loc).

    Each class draws from its own generator seeded by (seed, class), so the split of one class does
    not change when other classes are added or removed. xlsa17 holds out ~20% (1764 of 8821 on CUB).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    trainval, test_seen = [], []
    for c in np.asarray(seen_classes, dtype=np.int64):
        rows = np.flatnonzero(labels == c)
        rows = np.random.default_rng([seed, int(c)]).permutation(rows)
        n_test = int(round(test_fraction * len(rows)))
        if len(rows) > 1:  # keep at least one training image per seen class
            n_test = min(n_test, len(rows) - 1)
        test_seen.append(rows[:n_test])
        trainval.append(rows[n_test:])
    empty = np.empty(0, dtype=np.int64)
    return (np.sort(np.concatenate(trainval or [empty])).astype(np.int64),
            np.sort(np.concatenate(test_seen or [empty])).astype(np.int64))


def rows_of_classes(labels: np.ndarray, classes) -> np.ndarray:
    return np.flatnonzero(np.isin(labels, np.asarray(classes, dtype=np.int64))).astype(np.int64)
