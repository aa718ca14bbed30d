"""Class semantics a model can use: the checks that the cache reader (hence training, evaluation and
`msdn cache verify`) and every dataset adapter apply to `att` and `w2v_att`, and the robust
row normalisation the adapters that normalise class attributes share.

The heads L2-normalise both matrices in float32 (heads/msdn.py: `F.normalize(att)`, `F.normalize(w2v)`),
so a row is judged as they will see it:
- an `att` row must be finite and normalise to a unit vector: a zero row (or one whose norm
  overflows or underflows float32, e.g. values of 1e30 or 1e-45) would leave its class without
  semantics, and the run would score it 0 without a word;
- a `w2v_att` row must be finite and keep its length through normalisation, except a row that is
  zero as stored, which training accepts (the attribute's embedding starts at zero and, with
  trainable V, learns): SUN's released word vectors hold one, for attribute 88.
"""
from __future__ import annotations

import numpy as np
import torch

# Rows whose largest magnitude lies in this range are normalised in float32 exactly as every
# committed cache was (squares stay normal float32 numbers, so nothing overflows or underflows and
# the smaller entries lost to underflow are below float32's precision); others are scaled first.
_PLAIN_RANGE = (2.0 ** -40, 2.0 ** 40)


def unit_rows(values) -> np.ndarray:
    """`values` (C, A) with each row divided by its L2 norm, float32. Rows within _PLAIN_RANGE take
    the plain float32 computation (bit for bit what the adapters always did); the others are scaled by
    their largest magnitude in float64 first, so 1e30 or 1e-45 no longer overflow or underflow the
    norm. Rows that are zero or non-finite stay so (see `att_problem`)."""
    values = np.asarray(values, dtype=np.float32)
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        plain = values / np.linalg.norm(values, axis=1, keepdims=True)
        peak = np.abs(values).max(axis=1, keepdims=True).astype(np.float64) if values.size else \
            np.zeros((len(values), 1))
        scaled = values / np.where(peak > 0, peak, 1.0)
        robust = (scaled / np.linalg.norm(scaled, axis=1, keepdims=True)).astype(np.float32)
    inside = (peak >= _PLAIN_RANGE[0]) & (peak <= _PLAIN_RANGE[1])
    return np.where(inside, plain, robust)


def att_problem(att) -> tuple[int, str] | None:
    """(first bad row, why) for a class-attribute matrix the heads cannot use, else None."""
    att = np.asarray(att, dtype=np.float32)
    unit = _unit_length(att)
    for row in range(len(att)):
        if not np.isfinite(att[row]).all():
            return row, "holds NaN or inf"
        if not unit[row]:
            if not att[row].any():
                return row, "is all zero (the class would have no semantics)"
            return row, (f"does not normalise to a unit vector in float32 (largest magnitude "
                         f"{np.abs(att[row]).max():.3g}: its norm overflows or underflows)")
    return None


def w2v_problem(w2v) -> tuple[int, str] | None:
    """(first bad row, why) for attribute word vectors the heads cannot use, else None. A row that is
    zero as stored is accepted (see the module docstring)."""
    if w2v is None:
        return None
    w2v = np.asarray(w2v, dtype=np.float32)
    unit = _unit_length(w2v)
    for row in range(len(w2v)):
        if not np.isfinite(w2v[row]).all():
            return row, "holds NaN or inf"
        if w2v[row].any() and not unit[row]:
            return row, (f"does not normalise to a unit vector in float32 (largest magnitude "
                         f"{np.abs(w2v[row]).max():.3g}: its norm overflows or underflows)")
    return None


def _unit_length(matrix: np.ndarray) -> np.ndarray:
    """(rows,) bool: the row has length 1 once normalised as the heads do (torch, float32, eps 1e-12).
    False where the norm overflows (the row becomes 0), underflows below eps (a row of 1e-20 comes
    out with length 3e-8) or is not finite."""
    if matrix.ndim != 2 or not matrix.size:
        return np.ones(len(matrix), dtype=bool)
    unit = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(matrix)), dim=1).double()
    return (unit.norm(dim=1) - 1).abs().lt(1e-3).numpy()
