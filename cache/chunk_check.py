"""Decode and checksum stored feature rows in threads, straight from their raw chunks (verify's fast path).

h5py decodes chunks one after another inside one call while holding the GIL: verify would run at
one core's lzf speed. Here the main thread only fetches each row's stored chunk
(`read_direct_chunk`, a plain file read) and a pool of threads decodes it (liblzf's `lzf_decompress`
from h5py's own filter library through ctypes, or zlib, both releasing the GIL) and computes its
crc32. It applies to our layout: one row per chunk, at most one filter (lzf or gzip), little-endian
values. Anything else goes through h5py (cache/verify.py).
"""
from __future__ import annotations

import ctypes
import os
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np

from cache.writer import load_liblzf

_WINDOW = 64  # rows fetched ahead of the decoding threads (bounded memory)


_LZF = load_liblzf("lzf_decompress")


def applies(ds: h5py.Dataset) -> bool:
    filters = ds.id.get_create_plist().get_nfilters()
    little = ds.dtype.byteorder == "<" or (ds.dtype.byteorder in "=|" and sys.byteorder == "little")
    return (ds.chunks == (1, *ds.shape[1:]) and little and
            (ds.compression, filters) in ((None, 0), ("gzip", 1)) + ((("lzf", 1),) if _LZF else ()))


def check_rows(ds: h5py.Dataset, rows: np.ndarray, offset: int, expected, report) -> None:
    """Decode rows `rows` of `ds` (global row = offset + row) and compare with expected[global]."""
    nbytes = int(np.prod(ds.shape[1:])) * ds.dtype.itemsize
    tail = (0,) * (ds.ndim - 1)
    decode = _decoder(ds.compression, nbytes)
    threads = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
    with ThreadPoolExecutor(threads, thread_name_prefix="verify") as pool:
        for start in range(0, len(rows), _WINDOW):
            window = [int(r) for r in rows[start:start + _WINDOW]]
            stored = []
            for row in window:
                try:
                    stored.append(ds.id.read_direct_chunk((row, *tail)))
                except (OSError, RuntimeError, KeyError):
                    stored.append(None)
            for row, crc in zip(window, pool.map(decode, stored)):
                where = offset + row
                if crc is None:
                    report.unreadable_rows.append(where)
                    continue
                report.rows_checked += 1
                report.bytes_read += nbytes
                if expected is not None and crc != expected[where]:
                    report.corrupt_rows.append(where)


def _decoder(compression: str | None, nbytes: int):
    """stored (filter_mask, bytes) -> crc32 of the decoded row, or None when it does not decode."""
    def decode(stored):
        if stored is None:
            return None
        mask, chunk = stored
        if compression is None or mask & 1:  # filter skipped: stored raw (see ChunkCodec in cache/writer.py)
            raw = chunk
        elif compression == "gzip":
            try:
                raw = zlib.decompress(chunk)
            except zlib.error:
                return None
        else:
            out = ctypes.create_string_buffer(nbytes)
            if _LZF(chunk, len(chunk), out, nbytes) != nbytes:
                return None
            raw = out
        return zlib.crc32(raw) if len(raw) == nbytes else None
    return decode
