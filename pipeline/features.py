"""Cached region features held where the model reads them fastest, in the layout it reads them in.

The rows are converted once into a `RegionBank`: each region a unit-length row, laid
out (image, region, channel) as the head's one-GEMM forward wants, so a batch is one row gather
and no step transposes or normalises features again.

On a GPU the bank lives in device memory when it fits (CUB at 2048x14x14: 9.5 GB in 16 bits), and
the batch indices live there too: sampling and gathering never wait for the host. Otherwise the
bank stays in pinned host memory and each batch is gathered into one of two pinned staging
buffers and copied asynchronously, overlapping the copy of batch t+1 with the compute of batch t.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from cache.errors import UserError
from cache.reader import CacheError
from heads.regions import Regions, as_maps, normalise_into

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEVICE_MEMORY_SHARE = 0.7  # leave the rest for activations, the optimiser and evaluation scores
CHUNK_BYTES = 32 << 20  # raw maps read at a time: the bank's only large temporary


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
        first = as_maps(_read(source, 0, 1))
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


def bank_dtype(feature_dtype: str, amp: str) -> str:
    """Under bf16 autocast a 16-bit bank is held in bfloat16: autocast would round float16 rows
    to bfloat16 before every GEMM anyway, so storing them that way saves a cast per step."""
    return "bfloat16" if amp == "bf16" and feature_dtype == "float16" else feature_dtype


class _CacheRows:
    """The cache rows `rows` as a sliceable source for RegionBank: each slice is read, in the
    stored dtype (a float32 copy would double it for nothing), into one reused buffer, so a
    returned chunk is valid until the next one is read (RegionBank converts each at once).
    Rows that hold NaN or inf are noted on the way: a float16 cache stores inf for raw values above
    65504, and a row written as NaN passes its checksum. The test is one float32 sum per image (NaN
    or inf anywhere makes it non-finite), a few percent of the time the bank takes to build."""

    def __init__(self, cache, rows: np.ndarray, flipped_rows: np.ndarray | None = None):
        # `flipped_rows` follow `rows`: their flipped images' maps (a --flip cache)
        flipped_rows = np.empty(0, np.int64) if flipped_rows is None else flipped_rows
        self.cache, self.rows, self.flipped_from = cache, np.concatenate([rows, flipped_rows]), len(rows)
        self._buffer = torch.empty(0, dtype=cache.stored_dtype)
        self.nan_rows, self.inf_rows = set(), set()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: slice) -> torch.Tensor:
        rows = self.rows[index]
        shape = (len(rows), *self.cache.feature_shape)
        if self._buffer.numel() < math.prod(shape):
            self._buffer = torch.empty(math.prod(shape), dtype=self.cache.stored_dtype)
        block = self._buffer[:math.prod(shape)].view(shape)
        start, stop, _ = index.indices(len(self.rows))
        read_maps(self.cache, rows, max(0, min(stop, self.flipped_from) - start), block)
        flat = block.flatten(1)
        if not bool(torch.isfinite(flat.sum(1, dtype=torch.float32)).all()):
            self.inf_rows.update(rows[torch.isinf(flat).any(1).numpy()].tolist())
            self.nan_rows.update(rows[torch.isnan(flat).any(1).numpy()].tolist())
        return block

    def refuse_nonfinite(self) -> None:
        bad = sorted(self.inf_rows | self.nan_rows)
        if not bad:
            return
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        if self.inf_rows:
            why = (f"row {min(self.inf_rows)} holds inf, which a float16 cache stores for values above 65504: "
                   "re-extract with `msdn extract --dtype float32`")
        else:
            why = (f"row {bad[0]} holds NaN (its checksum can still match: written so, or damaged before the "
                   "checksum was taken): re-extract the cache")
        raise CacheError(f"{self.cache.path}: {len(bad)} of {len(self.rows)} rows used here hold non-finite "
                         f"features (cache rows {shown}); {why}")


class ResidentFeatures:
    """The bank of `rows`, followed (flip > 0) by the flipped maps of `flipped_rows` (training rows)."""

    def __init__(self, cache, rows: np.ndarray, device: torch.device, dtype: str = "float16",
                 max_batch: int = 1024, flipped_rows: np.ndarray | None = None):
        self.rows = np.unique(rows)
        self.flipped_rows = np.unique(flipped_rows) if flipped_rows is not None else np.empty(0, np.int64)
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        nbytes = (len(self.rows) + len(self.flipped_rows)) * math.prod(cache.feature_shape) * self.dtype.itemsize
        self.resident = self.device.type != "cuda" or device_holds(nbytes, self.device)
        self.index_device = self.device if self.resident else torch.device("cpu")
        source = _CacheRows(cache, self.rows, self.flipped_rows)
        self.bank = RegionBank(source, dtype=self.dtype, device=self.index_device,
                               pin_memory=not self.resident)
        source.refuse_nonfinite()
        if not self.resident:
            shape = (max_batch,) + tuple(self.bank.data.shape[1:])
            self._staging = [torch.empty(shape, dtype=self.dtype).pin_memory() for _ in range(2)]
            self._copied = [None, None]
            self._turn = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return self.bank.data.numel() * self.bank.data.element_size()

    @property
    def num_regions(self) -> int:
        return self.bank.num_regions

    @property
    def feature_dim(self) -> int:
        return self.bank.feature_dim

    def positions(self, cache_rows: np.ndarray) -> torch.Tensor:
        """Positions in this store of cache rows (all must be held)."""
        return held_positions(self, cache_rows)

    def flipped_positions(self, cache_rows: np.ndarray) -> torch.Tensor:
        return flipped_positions(self, cache_rows)

    def gather(self, positions: torch.Tensor) -> Regions:
        """Regions of the images at `positions` (on `index_device`), delivered on `device`."""
        if self.resident:
            return self.bank.take(positions)
        turn, self._turn = self._turn, 1 - self._turn
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # the buffer's previous copy must be done before reuse
        staging = self._staging[turn][: len(positions)]
        torch.index_select(self.bank.data, 0, positions, out=staging)
        batch = staging.to(self.device, non_blocking=True)
        self._copied[turn] = torch.cuda.Event()
        self._copied[turn].record()
        return Regions(batch.view(-1, self.bank.feature_dim), len(positions), self.bank.num_regions)

    def training_batches(self, positions: torch.Tensor, sampler, steps: int, batch_size: int):
        """(picked, Regions) for `steps` batches drawn by `sampler` (positions into `positions`)."""
        for _ in range(steps):
            picked = sampler()
            yield picked, self.gather(positions[picked])

    def batches(self, positions: torch.Tensor, batch_size: int):
        """Consecutive slices of `positions`, gathered (evaluation)."""
        for start in range(0, len(positions), batch_size):
            yield self.gather(positions[start:start + batch_size])


def read_maps(cache, rows: np.ndarray, originals: int, out: torch.Tensor) -> None:
    """out[:originals] = the maps of rows[:originals]; out[originals:] = the flipped images' maps
    of the rest (a store's positions hold the originals first, then the flipped maps)."""
    cache.features(rows=rows[:originals], out=out[:originals])
    if originals < len(rows):  # a cache without flipped maps is never asked for them
        cache.features(rows=rows[originals:], out=out[originals:], flipped=True)


def held_positions(store, cache_rows: np.ndarray) -> torch.Tensor:
    """Positions of `cache_rows` in a store's sorted `rows`, on its `index_device`; a row the store
    does not hold is a KeyError (a bug: every store is built over the rows its run uses)."""
    return _positions_in(store, store.rows, cache_rows)


def _positions_in(store, held: np.ndarray, cache_rows: np.ndarray) -> torch.Tensor:
    pos = np.searchsorted(held, cache_rows)
    if len(cache_rows) and (pos.max() >= len(held) or not np.array_equal(held[pos], cache_rows)):
        raise KeyError(f"{type(store).__name__}.positions: some rows are not held")
    return torch.as_tensor(pos, dtype=torch.long, device=store.index_device)


class NoFlippedMapsError(UserError, ValueError):
    """flip > 0 on a cache extracted without --flip."""


def flipped_training_rows(cache, flip: float, train_rows: np.ndarray) -> np.ndarray | None:
    """The rows whose flipped maps a run with `flip` holds: its training rows (None at flip = 0,
    where nothing flipped is read); refused before any work when the cache has none."""
    if flip <= 0:
        return None
    if not cache.has_flipped:
        raise NoFlippedMapsError(f"{cache.path}: flip={flip:g} needs the maps of the flipped images, which this cache "
                                 "does not hold; extract it again with `msdn extract --flip` (or --set flip=0)")
    return np.unique(train_rows)


def flipped_positions(store, cache_rows: np.ndarray) -> torch.Tensor:
    """Positions of the flipped maps of `cache_rows`: they follow the store's `rows`."""
    return _positions_in(store, store.flipped_rows, cache_rows) + len(store.rows)


class FlippedDraw:
    """`positions[picked]` (as a tensor of positions), each sample swapped for its flipped map's
    position with probability `p`, drawn per sample from `generator` (seeded from the run's seed)."""

    def __init__(self, positions: torch.Tensor, flipped: torch.Tensor, p: float, generator: torch.Generator):
        self.positions, self.flipped, self.p, self.generator = positions, flipped, p, generator

    def __getitem__(self, picked: torch.Tensor) -> torch.Tensor:
        use = torch.rand(len(picked), device=self.positions.device, generator=self.generator) < self.p
        return torch.where(use, self.flipped[picked], self.positions[picked])


def device_holds(nbytes: int, device: torch.device) -> bool:
    """A CUDA device has room for a bank of `nbytes` next to the training's own memory."""
    return nbytes < DEVICE_MEMORY_SHARE * _free_bytes(device)


def _free_bytes(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return free
