"""Cached region features held where the model reads them fastest.

On a GPU the whole feature set lives in device memory as float16/bfloat16 when it fits (CUB at
2048x14x14: 9.5 GB in float16), so a training batch is one index_select. Otherwise it stays in
pinned host memory and each batch is gathered into one of two pinned staging buffers and copied
asynchronously, overlapping the copy of batch t+1 with the compute of batch t.
"""
from __future__ import annotations

import math

import numpy as np
import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEVICE_MEMORY_SHARE = 0.7  # leave the rest for activations, the optimiser and evaluation scores


class FeatureStore:
    def __init__(self, cache, rows: np.ndarray, device: torch.device, dtype: str = "float16",
                 max_batch: int = 1024):
        self.rows = np.unique(rows)
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        nbytes = len(self.rows) * math.prod(cache.feature_shape) * self.dtype.itemsize
        self.resident = self.device.type != "cuda" or nbytes < DEVICE_MEMORY_SHARE * _free_bytes(self.device)
        self.index_device = self.device if self.resident else torch.device("cpu")
        self.features = cache.features(rows=self.rows, device=self.device if self.resident else "cpu",
                                       dtype=self.dtype)
        if not self.resident:
            self.features = self.features.pin_memory()
            shape = (max_batch,) + tuple(self.features.shape[1:])
            self._staging = [torch.empty(shape, dtype=self.dtype).pin_memory() for _ in range(2)]
            self._copied = [None, None]
            self._turn = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    def positions(self, cache_rows: np.ndarray) -> torch.Tensor:
        """Positions in this store of cache rows (all must be held)."""
        pos = np.searchsorted(self.rows, cache_rows)
        if len(cache_rows) and (pos.max() >= len(self.rows) or not np.array_equal(self.rows[pos], cache_rows)):
            raise KeyError("FeatureStore.positions: some rows are not held")
        return torch.as_tensor(pos, dtype=torch.long, device=self.index_device)

    def gather(self, positions: torch.Tensor) -> torch.Tensor:
        """Features at `positions` (on `index_device`), delivered on `device`."""
        if self.resident:
            return self.features.index_select(0, positions)
        turn, self._turn = self._turn, 1 - self._turn
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # the buffer's previous copy must be done before reuse
        staging = self._staging[turn][: len(positions)]
        torch.index_select(self.features, 0, positions, out=staging)
        batch = staging.to(self.device, non_blocking=True)
        self._copied[turn] = torch.cuda.Event()
        self._copied[turn].record()
        return batch

    def batches(self, positions: torch.Tensor, batch_size: int):
        """Consecutive slices of `positions`, gathered (evaluation)."""
        for start in range(0, len(positions), batch_size):
            yield self.gather(positions[start:start + batch_size])


def _free_bytes(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return free
