"""Region features in the layout the head's GEMM wants: one row per region, (B*R, f), each row
L2-normalised over channels (docs/method.md).

`prepare_regions` converts a batch of feature maps (one transposing copy); `normalise_into` does
it in bounded pieces into a preallocated tensor, which is how the feature stores of pipeline/features.py
and pipeline/streaming.py fill their rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Regions:
    rows: torch.Tensor  # (batch * regions, f), contiguous, unit-length rows
    batch: int
    regions: int

    @property
    def feature_dim(self) -> int:
        return self.rows.shape[1]

    def __len__(self) -> int:
        return self.batch

    def float(self) -> "Regions":
        """The same regions in float32 (callers written for feature-map batches use .float())."""
        return Regions(self.rows.float(), self.batch, self.regions)


def as_maps(features: torch.Tensor) -> torch.Tensor:
    if features.dim() == 4:
        return features.flatten(2)
    if features.dim() != 3:
        raise ValueError(f"features must be (B, f, H, W) or (B, f, R), got {tuple(features.shape)}")
    return features


def prepare_regions(features: torch.Tensor, dtype: torch.dtype | None = None, *,
                    out: torch.Tensor | None = None) -> Regions:
    """(B, f, H, W) or (B, f, R) maps -> Regions in `dtype` (default: the input's), written into
    `out` (a (B, R, f) tensor, e.g. a slice of a bank) when given, so no batch-sized temporary is made.
    Norms are taken in float32 (a float16 sum of 2048 squares can overflow); F.normalize's eps."""
    maps = as_maps(features)
    B, f, R = maps.shape
    rows = torch.empty((B, R, f), dtype=dtype or maps.dtype, device=maps.device) if out is None else out
    rows.copy_(maps.transpose(1, 2))
    inv_norm = torch.linalg.vector_norm(rows, dim=2, keepdim=True, dtype=torch.float32)
    inv_norm = inv_norm.clamp_min_(1e-12).reciprocal_()
    # A zero region's 1e12 overflows float16 (0 * inf = NaN): scale float16 in float32 there.
    rows.mul_(inv_norm if torch.finfo(rows.dtype).max < 1e12 else inv_norm.to(rows.dtype))
    return Regions(rows.view(B * R, f), B, R)


# Images normalised at a time: the float32 norms make a float32 copy of what they reduce, and under
# keep_freed_memory (heads/runtime.py) freed blocks of tens of MB are not reused but pile up (a
# 32 MB chunk's temporaries added ~0.9 GB to a 0.4 GB bank); blocks of a few MB are reused.
NORMALISE_BYTES = 4 << 20


def normalise_into(out: torch.Tensor, maps: torch.Tensor, order=None) -> None:
    """out[k] = prepare_regions(maps[order[k]]) for a (n, R, f) `out` (default order: maps' own),
    NORMALISE_BYTES of regions at a time. Every feature store fills its rows through here, so a
    resident bank and a streamed batch hold the same bits."""
    step = max(1, NORMALISE_BYTES // (out.shape[1] * out.shape[2] * 4))
    for at in range(0, len(out), step):
        part = maps[at:at + step] if order is None else maps[torch.as_tensor(order[at:at + step])]
        prepare_regions(part, out.dtype, out=out[at:at + len(part)])
