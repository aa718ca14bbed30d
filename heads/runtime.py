"""Process-wide CPU setting that the head's large temporaries need to run at matmul speed.

glibc serves every allocation above ~32 MiB with a fresh mmap and returns it on free, so each
training step page-faults its (B*R, 4A) activations and their gradients in again: on CUB shapes
that costs about as much as the bfloat16 GEMMs themselves (docs/speed.md, "Training speed"). Serving large
blocks from the heap and not trimming it makes a step reuse the same (already mapped) memory.
The price: memory freed by the process is kept for reuse instead of returned to the system.
Call once at start-up of a training/evaluation process (engine, bench); a no-op off glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_GLIBC_DEFAULTS = {_M_MMAP_MAX: 65536, _M_MMAP_THRESHOLD: 128 * 1024, _M_TRIM_THRESHOLD: 128 * 1024}


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def keep_freed_memory(enable: bool = True) -> bool:
    """enable=True: large tensors come from the heap and freed memory stays mapped for reuse.
    enable=False: back to glibc's defaults (used by the bench to time the reference untuned).
    Returns False where glibc's mallopt is unavailable (nothing changed)."""
    libc = _libc()
    if libc is None:
        return False
    settings = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 1 << 30} if enable else _GLIBC_DEFAULTS
    return all(libc.mallopt(option, value) == 1 for option, value in settings.items())
