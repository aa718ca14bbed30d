"""Cached region features read from the HDF5 file batch by batch, for caches larger than memory.

`StreamingFeatures` answers the same calls as `ResidentFeatures` (positions, batches, training
batches) and delivers the same Regions, bit for bit: each batch's rows are read in the file's
order (sorted: contiguous runs are one h5py call), then normalised into the batch order by the same
`heads.regions.normalise_into` that fills the resident bank. A background thread runs ahead: it
draws the next batches with the run's own sampler (so the sequence of batches is the resident
run's), reads and normalises them into a small ring of preallocated buffers (fresh buffers per
batch would fragment the heap under keep_freed_memory), while the main thread computes.
Memory: `read_ahead + 2` batches of training rows, three evaluation batches and one read buffer.
"""
from __future__ import annotations

import math
import queue
import threading

import numpy as np
import torch

from heads.regions import Regions, normalise_into
from pipeline.features import DTYPES, flipped_positions, held_positions, read_maps

READ_AHEAD = 2  # batches prepared ahead of the one being computed
_DONE = object()


class StreamingFeatures:
    resident = False

    def __init__(self, cache, rows: np.ndarray, device: torch.device, dtype: str = "float16",
                 read_ahead: int = READ_AHEAD, flipped_rows: np.ndarray | None = None):
        self.cache = cache
        self.rows = np.unique(rows)
        # positions from len(rows) on are the flipped maps of these (training) rows (flip > 0)
        self.flipped_rows = np.unique(flipped_rows) if flipped_rows is not None else np.empty(0, np.int64)
        self._all_rows = np.concatenate([self.rows, self.flipped_rows])
        self.device = torch.device(device)
        self.index_device = self.device  # the sampler draws where the resident run draws: same batches
        self.dtype = DTYPES[dtype]
        self.read_ahead = read_ahead
        self.num_regions = math.prod(cache.feature_shape[1:])
        self.feature_dim = int(cache.feature_shape[0])
        self._rings: dict[str, list[torch.Tensor]] = {}
        # one per kind: the training thread reads ahead while an evaluation streams
        self._read_buffers: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        """Bytes of the batch buffers held (what replaces the bank)."""
        held = [*(t for ring in self._rings.values() for t in ring), *self._read_buffers.values()]
        return sum(t.numel() * t.element_size() for t in held)

    def positions(self, cache_rows: np.ndarray) -> torch.Tensor:
        """Positions in this store of cache rows (all must be held)."""
        return held_positions(self, cache_rows)

    def flipped_positions(self, cache_rows: np.ndarray) -> torch.Tensor:
        return flipped_positions(self, cache_rows)

    # ------------------------------------------------------------------ the two kinds of batches
    def training_batches(self, positions: torch.Tensor, sampler, steps: int, batch_size: int):
        """(picked, Regions) for `steps` batches drawn by `sampler`, read ahead on a thread."""
        def produce():
            for _ in range(steps):
                picked = sampler()
                yield picked, positions[picked].cpu().numpy()
        return self._stream("train", produce(), batch_size, self.read_ahead)

    def batches(self, positions: torch.Tensor, batch_size: int):
        """Consecutive slices of `positions`, read ahead (evaluation)."""
        held = positions.cpu().numpy()
        produce = ((None, held[start:start + batch_size]) for start in range(0, len(held), batch_size))
        return (regions for _, regions in self._stream("eval", produce, batch_size, 1))

    # ------------------------------------------------------------------ reading
    def _ring(self, kind: str, size: int, batch_size: int) -> list[torch.Tensor]:
        shape = (batch_size, self.num_regions, self.feature_dim)
        ring = self._rings.get(kind)
        if ring is None or len(ring) != size or ring[0].shape[0] < batch_size:
            with torch.inference_mode(False):  # the reading thread writes them outside inference mode
                ring = self._rings[kind] = [torch.empty(shape, dtype=self.dtype) for _ in range(size)]
        return ring

    def _read(self, kind: str, positions: np.ndarray, out: torch.Tensor) -> None:
        """out[k] = normalised regions of the map at positions[k], read in the file's order (the
        originals first, then the flipped maps)."""
        rows, flipped = self._all_rows[positions], positions >= len(self.rows)
        order = np.lexsort((rows, flipped))  # stable: without flipped maps, argsort(rows, kind="stable")
        shape = (len(rows), *self.cache.feature_shape)
        buffer = self._read_buffers.get(kind)
        if buffer is None or buffer.numel() < math.prod(shape):
            buffer = self._read_buffers[kind] = torch.empty(math.prod(shape), dtype=self.cache.stored_dtype)
        maps = buffer[:math.prod(shape)].view(shape)
        read_maps(self.cache, rows[order], int((~flipped).sum()), maps)
        normalise_into(out, maps, order=np.argsort(order))  # back to the sampler's order

    def _stream(self, kind: str, produce, batch_size: int, ahead: int):
        # a buffer is rewritten only after the consumer has moved on from it: the producer can hold
        # `ahead` batches in the queue and be filling one more while the consumer uses another
        ring = self._ring(kind, ahead + 2, batch_size)
        ready: queue.Queue = queue.Queue(maxsize=ahead)
        stop = threading.Event()

        def work():
            try:
                for turn, (picked, positions) in enumerate(produce):
                    out = ring[turn % len(ring)][:len(positions)]
                    self._read(kind, positions, out)
                    _put(ready, (picked, out), stop)
                    if stop.is_set():
                        return
                _put(ready, _DONE, stop)
            except BaseException as err:  # handed to the consumer, which raises it
                _put(ready, err, stop)

        worker = threading.Thread(target=work, name=f"msdn-stream-{kind}", daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                picked, out = item
                rows = out.to(self.device).view(-1, self.feature_dim)
                yield picked, Regions(rows, out.shape[0], self.num_regions)
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass
            worker.join()


def _put(ready: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.1)
            return
        except queue.Full:
            continue
