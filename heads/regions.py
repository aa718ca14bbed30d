"""Region features in the layout the head's GEMM wants: one row per region, (B*R, f), each row
L2-normalised over channels (docs/method.md).

`prepare_regions` converts a batch of feature maps (one transposing copy). `RegionBank` does that
once for a whole cache and keeps the result resident (CPU RAM or GPU memory), so a training batch
is a single row gather and the per-step normalisation disappears.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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


def _as_maps(features: torch.Tensor) -> torch.Tensor:
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
    maps = _as_maps(features)
    B, f, R = maps.shape
    rows = torch.empty((B, R, f), dtype=dtype or maps.dtype, device=maps.device) if out is None else out
    rows.copy_(maps.transpose(1, 2))
    inv_norm = torch.linalg.vector_norm(rows, dim=2, keepdim=True, dtype=torch.float32)
    inv_norm = inv_norm.clamp_min_(1e-12).reciprocal_()
    # A zero region's 1e12 overflows float16 (0 * inf = NaN): scale float16 in float32 there.
    rows.mul_(inv_norm if torch.finfo(rows.dtype).max < 1e12 else inv_norm.to(rows.dtype))
    return Regions(rows.view(B * R, f), B, R)


CHUNK_BYTES = 32 << 20  # raw maps read at a time: the bank's only large temporary
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


def _read(source, start: int, stop: int) -> torch.Tensor:
    block = source[start:stop]
    if not isinstance(block, torch.Tensor):
        block = torch.from_numpy(np.ascontiguousarray(block))
    return block.float() if block.dtype == torch.float64 else block


class RegionBank:
    """Pre-normalised region features of many images, resident on `device` as (N, R, f).

    `source` is anything that gives (n, f, H, W) or (n, f, R) arrays for a slice of rows: a tensor,
    a numpy array, an h5py dataset or a lazy cache reader; it is converted `chunk` images at a time
    (default: ~CHUNK_BYTES of raw maps) straight into the bank, so the only temporary next to the
    bank is one small chunk: a larger one costs its size again in peak memory, and on glibc with
    `keep_freed_memory` the freed chunks fragment the heap into several times the bank's size. Pick `dtype` to match the compute:
    bfloat16 under bf16 autocast, float16 (no precision lost relative to a float16 cache) or float32
    otherwise.
    """

    def __init__(self, source, dtype: torch.dtype = torch.float16, device="cpu", chunk: int | None = None,
                 pin_memory: bool = False):
        n = len(source)
        if n == 0:
            raise ValueError("RegionBank: the source has no images")
        first = _as_maps(_read(source, 0, 1))
        _, f, R = first.shape
        chunk = chunk or max(1, CHUNK_BYTES // (first.numel() * first.element_size()))
        # pin_memory: a host bank that feeds a GPU through asynchronous copies
        self.data = torch.empty((n, R, f), dtype=dtype, device=device, pin_memory=pin_memory)
        for start in range(0, n, chunk):
            block = _read(source, start, start + chunk).to(device)
            normalise_into(self.data[start:start + len(block)], block)

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.data.shape[2]

    @property
    def num_regions(self) -> int:
        return self.data.shape[1]

    def take(self, index: torch.Tensor) -> Regions:
        """Regions of the images `index` (a LongTensor on the bank's device): one gather.
        Advanced indexing, not index_select: on CPU it is much faster for float16/bfloat16."""
        rows = self.data[index]
        return Regions(rows.view(-1, self.feature_dim), rows.shape[0], self.num_regions)

    def slice(self, start: int, stop: int) -> Regions:
        """Regions of images start..stop-1 without a copy (evaluation in large batches)."""
        rows = self.data[start:stop]
        return Regions(rows.reshape(-1, self.feature_dim), rows.shape[0], self.num_regions)
