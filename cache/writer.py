"""Crash-safe row writer for a feature cache being extracted (layout: cache/layout.py).

Order of operations per batch: write the feature rows and their `row_crc32` checksums, flush, then
set their `done` flags, flush.
A row is therefore never marked done before its data is on disk. The file is written in SWMR mode,
in which HDF5 orders its metadata writes so that the file on disk is consistent at every moment:
after a kill -9 the done rows are intact and readable. Such a file still carries HDF5's "open for
writing" flag, which only HDF5's `h5clear` tool resets; `CacheWriter` instead copies the done rows'
compressed chunks as they are (no recompression) into a fresh file and continues from there.

Rows are compressed by `ChunkCodec` threads and handed to HDF5 as finished chunks (`write_direct_chunk`).

h5py compresses inside H5Dwrite while holding the GIL, one chunk after another, far below what a
GPU extracts (a few hundred rows/s with lzf on one core; docs/speed.md, "GPU path"). Here
each row is compressed by a thread in C code that releases the GIL, producing exactly the bytes the
HDF5 filter would store, and HDF5 only copies them into the file:

- gzip: a zlib stream (what HDF5's deflate filter writes; zlib.compress releases the GIL);
- lzf: the raw output of liblzf's `lzf_compress`, called through ctypes from h5py's own filter
  library (h5py/h5z), as h5py's filter does; when a row does not shrink, the chunk is stored raw
  with the filter's bit set in the chunk's filter mask, as HDF5 does for this optional filter;
- none: the raw bytes.
Where h5py's library does not export `lzf_compress`, lzf rows go through h5py's normal write path.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from cache.errors import UserError
from cache.layout import (
    CONTENT_KEY_ATTR,
    DONE,
    FEATURES,
    FLIPPED_FEATURES,
    FLIPPED_ROW_CRC32,
    GZIP_LEVEL,
    LIBVER,
    ROW_CRC32,
    SKIPPED,
    is_writer_flag_error,
    row_crc32,
)
from cache.locks import BUSY, lock_holder, same_file, try_lock


class ExtractError(UserError, RuntimeError):
    """The extraction cannot start or go on; the message names the file and what to do."""


class CacheWriteError(ExtractError):
    """The partial file cannot be opened or continued; the message names it."""


class CacheWriter:
    """Open a partial cache file for writing rows (context manager). `codec_threads` compress rows
    in parallel (`ChunkCodec`, below)."""

    def __init__(self, path: str | Path, codec_threads: int = 1):
        self.path = Path(path)
        self.file = open_for_writing(self.path)
        self.file.swmr_mode = True
        self.features = self.file[FEATURES]
        self.codec = ChunkCodec(self.features, codec_threads)
        self._done_ds, self._skipped_ds = self.file[DONE], self.file[SKIPPED]
        # Older files have no checksum key (and SWMR cannot add one): they are written without.
        self._crc_ds = self.file[ROW_CRC32] if ROW_CRC32 in self.file else None
        # --flip files: the flipped images' maps, written with the originals before `done`.
        self.flipped = self.file[FLIPPED_FEATURES] if FLIPPED_FEATURES in self.file else None
        self.done = self._done_ds[:]          # in-memory mirrors: the file is the source of truth
        self.skipped = self._skipped_ds[:]

    @property
    def content_key(self) -> str:
        return str(self.file.attrs[CONTENT_KEY_ATTR])

    @property
    def num_images(self) -> int:
        return len(self.done)

    def todo_rows(self) -> np.ndarray:
        """Rows without valid features yet (skipped rows are retried)."""
        return np.flatnonzero(~self.done)

    def write(self, rows: np.ndarray, features: np.ndarray, flipped: np.ndarray | None = None) -> None:
        """Store features[k] (and in a --flip file flipped[k]) in row rows[k], then mark those rows
        done (in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        if (flipped is None) != (self.flipped is None):
            raise ValueError(f"{self.path}: flipped maps must be written exactly when the file holds "
                             f"{FLIPPED_FEATURES}")
        self._write_maps(rows, features, self.features, self._crc_ds)
        if flipped is not None:
            self._write_maps(rows, flipped, self.flipped, self.file[FLIPPED_ROW_CRC32])
        self.file.flush()
        self._set(self._done_ds, self.done, rows, True)
        if self.skipped[rows].any():
            self._set(self._skipped_ds, self.skipped, rows, False)
        self.file.flush()

    def _write_maps(self, rows: np.ndarray, maps: np.ndarray, dataset, crc_dataset) -> None:
        if crc_dataset is not None:  # crc32 releases the GIL: the codec's threads share the work
            crcs = np.fromiter(self.codec.pool.map(lambda row: row_crc32(row, dataset.dtype), maps),
                               dtype=np.uint32, count=len(rows))
            for start, stop, offset in _runs(rows):
                crc_dataset[start:stop] = crcs[offset:offset + stop - start]
        if self.codec.direct:
            tail = (0,) * (dataset.ndim - 1)
            for row, (mask, chunk) in zip(rows.tolist(), self.codec.encode_rows(maps)):
                dataset.id.write_direct_chunk((row, *tail), chunk, mask)
        else:
            for start, stop, offset in _runs(rows):
                dataset[start:stop] = maps[offset:offset + stop - start]

    def mark_skipped(self, rows: np.ndarray) -> None:
        """Record unreadable images; their features stay zero (the fill value) and not done."""
        rows = np.asarray(rows, dtype=np.int64)
        self._set(self._skipped_ds, self.skipped, rows, True)
        self.file.flush()

    @staticmethod
    def _set(dataset, mirror: np.ndarray, rows: np.ndarray, value: bool) -> None:
        mirror[rows] = value
        for start, stop, _ in _runs(rows):
            dataset[start:stop] = mirror[start:stop]

    def close(self) -> None:
        self.codec.close()
        if self.file.id.valid:
            self.file.close()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def output_lock(out: str | Path, log=None):
    """Hold `<out>.lock` (fcntl.flock, as the store's key locks) for a whole extraction into `out`, so
    a second extraction of the same file, with --resume or without, refuses at once instead of taking
    the live `<out>.partial` for a killed writer's. A lock left by a killed process is taken over
    (the kernel dropped it with the process); the lock file is removed on the way out.
    Where nothing can be created beside `out` (a read-only folder) no one can write there either,
    and where the filesystem has no locks, a warning is logged: both go on unlocked."""
    out = Path(out)
    path = out.with_name(out.name + ".lock")
    fd = _take_lock(out, path, log)
    if fd is None:
        yield None
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still held: a waiter that opened it finds another inode and retries
        os.close(fd)


def _take_lock(out: Path, path: Path, log) -> int | None:
    """The descriptor holding `path`'s flock; None where no lock can be had (see output_lock)."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            return None
        why = try_lock(fd)  # closes fd unless it holds the lock
        if why == BUSY:
            raise ExtractError(f"{out}: another process is writing it ({lock_holder(path)}, holding {path.name}); wait "
                               "for it to finish, or stop it and rerun with --resume")
        if why is not None:
            if log:
                log(f"warning: {path.parent}: no file locks here ({why}); nothing stops "
                    f"a second extraction of {out.name} from writing at the same time")
            return None
        if same_file(fd, path):  # else the holder removed it between our open and our lock: again
            return fd
        os.close(fd)


def _runs(rows: np.ndarray):
    """Split rows into maximal runs of consecutive indices: (start, stop, offset into rows)."""
    if len(rows) == 0:
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
        yield int(rows[lo]), int(rows[hi - 1]) + 1, int(lo)


def open_for_writing(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r+", libver=LIBVER)
    except OSError as err:
        if not is_writer_flag_error(err):
            raise CacheWriteError(f"{path}: cannot open the partial feature file for writing ({err}); "
                                  "if no other extraction is using it, delete it or pass --overwrite") from None
    recover_killed_file(path)
    return h5py.File(path, "r+", libver=LIBVER)


def recover_killed_file(path: Path) -> None:
    """Rewrite a file left by a killed SWMR writer: every key and attribute, and the done rows'
    feature chunks (original and flipped) byte for byte. Rows not done are left out (they are recomputed)."""
    tmp = path.with_name(path.name + ".recovering")
    try:
        src = h5py.File(path, "r", libver=LIBVER, swmr=True)
    except OSError as err:
        raise CacheWriteError(f"{path}: the partial feature file is damaged ({err}); delete it or "
                              "pass --overwrite to start again") from None
    with src, h5py.File(tmp, "w", libver=LIBVER) as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        maps = [key for key in (FEATURES, FLIPPED_FEATURES) if key in src]
        for key in src:
            if key not in maps:
                src.copy(src[key], dst, name=key)
        done = src[DONE][:]
        for key in maps:
            source, target = src[key], dst.create_dataset_like(key, src[key])
            for row in np.flatnonzero(done):
                offset = (int(row),) + (0,) * (source.ndim - 1)
                filter_mask, chunk = source.id.read_direct_chunk(offset)
                target.id.write_direct_chunk(offset, chunk, filter_mask)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the chunk codec
def load_liblzf(name: str = "lzf_compress"):
    """liblzf's `lzf_compress` or `lzf_decompress` from h5py's filter library (same signature:
    in, in_len, out, out_len -> bytes written, 0 on failure), or None where it is not exported."""
    try:
        fn = getattr(ctypes.CDLL(h5py.h5z.__file__), name)  # CDLL calls release the GIL
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint]
    fn.restype = ctypes.c_uint
    return fn


_LZF = load_liblzf()


class ChunkCodec:
    """Encodes rows of `dataset` (chunks of one row) as the chunks HDF5 would store."""

    def __init__(self, dataset: h5py.Dataset, threads: int):
        self.compression = dataset.compression  # None | "gzip" | "lzf"
        filters = dataset.id.get_create_plist().get_nfilters()
        self.direct = (self.compression in (None, "gzip") or _LZF is not None) and \
            filters == (0 if self.compression is None else 1)  # only ever one filter in our files
        self.level = dataset.compression_opts if self.compression == "gzip" else None
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="chunk-codec")

    def encode_rows(self, rows: np.ndarray) -> list[tuple[int, bytes]]:
        """[(filter_mask, chunk bytes)] for each row of `rows` (n, C, H, W)."""
        return list(self.pool.map(self._encode, list(np.ascontiguousarray(rows))))

    def _encode(self, row: np.ndarray) -> tuple[int, bytes]:
        if self.compression is None:
            return 0, row.tobytes()
        if self.compression == "gzip":
            return 0, zlib.compress(row, self.level if self.level is not None else GZIP_LEVEL)
        out = ctypes.create_string_buffer(row.nbytes)
        size = _LZF(row.ctypes.data, row.nbytes, out, row.nbytes)
        if size == 0:  # incompressible: stored raw, filter 0 flagged as skipped
            return 1, row.tobytes()
        return 0, out.raw[:size]

    def close(self) -> None:
        self.pool.shutdown(wait=True)
