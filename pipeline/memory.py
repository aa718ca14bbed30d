"""Which feature store a run uses: the resident bank when it fits the memory the run may take,
else streaming from the cache file (pipeline/streaming.py); both give the same batches.

The limit is `--max-memory SIZE` (the whole process's resident memory) or, by default, what the
process holds now plus 80% of the memory the system reports available (MemAvailable, within a
cgroup's own limit). A host bank is chosen when the process's current footprint, the bank and the
working set of the training and evaluation steps fit under it. A --max-memory above the machine's
memory is capped at it; one below what even streaming needs is refused before anything is written,
naming that minimum. The choice, the figures and why are returned for the run's config.json and log.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from pipeline.config import ConfigError
from pipeline.engine import EVAL_HOST_BYTES
from pipeline.features import DTYPES, ResidentFeatures, device_holds
from pipeline.streaming import READ_AHEAD, StreamingFeatures

AVAILABLE_SHARE = 0.8  # of MemAvailable, for "auto": the page cache and other processes keep the rest
# Live float32 copies of a training batch's (regions x 4 attributes) projection in one step
# (forward temporaries, their gradients, the allocator's slack); ~0.85 GB on CUB at batch 50, measured.
TRAIN_STEP_COPIES = 12
FORCE_ENV = "MSDN_FEATURE_STORE"


def parse_max_memory(text: str | None) -> int | None:
    """None/"auto" -> None; "6G", "500M", "0" -> bytes. Errors name --max-memory."""
    if text is None or str(text).strip().lower() == "auto":
        return None
    from cache.store import StoreError, parse_size
    try:
        size = parse_size(str(text))
    except StoreError:
        size = -1
    if size < 0:
        raise ConfigError(f"--max-memory: {text!r} is not a size (e.g. 6G, 500M, or auto)")
    return size


def machine_memory() -> int:
    """MemTotal, or less when a cgroup (v2) limit is lower: the most a --max-memory can mean."""
    total, cgroup = _meminfo("MemTotal") or 1 << 62, _cgroup_memory()
    return total if cgroup is None else min(total, cgroup[0])


def process_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    return 0


def available_memory() -> int:
    """MemAvailable, or less when a cgroup (v2) limit leaves less."""
    available, cgroup = _meminfo("MemAvailable"), _cgroup_memory()
    if cgroup is not None:
        room = max(0, cgroup[0] - cgroup[1])
        available = room if available is None else min(available, room)
    return available if available is not None else 1 << 62


def _meminfo(field: str) -> int | None:
    """A /proc/meminfo figure in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) << 10
    except OSError:
        pass
    return None


def _cgroup_memory() -> tuple[int, int] | None:
    """(memory.max, memory.current) of this process's cgroup (v2); None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit), int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def working_bytes(cache, num_attributes: int, batch_size: int) -> int:
    """Memory the training step and an evaluation batch take on top of the features."""
    regions = math.prod(cache.feature_shape[1:])
    return TRAIN_STEP_COPIES * batch_size * regions * 4 * num_attributes * 4 + EVAL_HOST_BYTES


def memory_plan(cache, rows, device: torch.device, dtype: str, *, max_memory: str | None, batch_size: int,
                eval_batch_size: int, num_attributes: int, flipped_rows=None) -> dict:
    """Which store the run uses and why (see the module docstring), decided before anything is
    written. A --max-memory above this machine's memory is capped at it; one below what even
    streaming needs is refused (ConfigError) with that minimum. MSDN_FEATURE_STORE=resident|streaming
    picks the store whatever the limit (tests and benchmarks on caches too small to stream otherwise).
    `flipped_rows` (training with flip > 0): their flipped maps are held too, and counted."""
    import numpy as np
    limit = parse_max_memory(max_memory)
    flipped = 0 if flipped_rows is None else len(np.unique(flipped_rows))
    n = len(np.unique(rows)) + flipped
    per_image = math.prod(cache.feature_shape) * DTYPES[dtype].itemsize
    bank = n * per_image
    runtime = process_rss()
    working = working_bytes(cache, num_attributes, batch_size)
    source = "--max-memory" if limit is not None else f"{AVAILABLE_SHARE:.0%} of available memory"
    plan = {"flipped_rows": flipped} if flipped else {}
    if limit is not None and limit > machine_memory():
        plan["capped"] = f"--max-memory {max_memory} is more than this machine's {_gb(machine_memory())}: capped at that"
        limit = machine_memory()
    if limit is None:
        limit = runtime + int(AVAILABLE_SHARE * available_memory())
    plan.update(limit_bytes=limit, limit_from=source, runtime_bytes=runtime, bank_bytes=bank, working_bytes=working)
    streamed = min(bank, (READ_AHEAD + 3) * batch_size * per_image + 4 * min(eval_batch_size, 128) * per_image)
    minimum = runtime + streamed + working
    if source == "--max-memory" and limit < minimum:
        raise ConfigError(f"--max-memory {max_memory}: below the ~{_gb(minimum)} this run needs even streaming its "
                          f"features (this process {_gb(runtime)}, read-ahead {_gb(streamed)}, training and evaluation "
                          f"working set {_gb(working)}); pass at least {math.ceil(minimum / (1 << 20))}M, or auto")
    forced = os.environ.get(FORCE_ENV, "")
    if forced in ("resident", "streaming"):
        plan.update(mode=forced, reason=f"{FORCE_ENV}={forced}")
    elif device.type == "cuda" and device_holds(bank, device):
        plan.update(mode="resident", reason="the bank fits in device memory")
    elif runtime + bank + working <= limit:
        plan.update(mode="resident", reason=f"runtime + bank + working set fit {source}")
    else:
        plan.update(mode="streaming", reason=f"runtime + bank + working set exceed {source}")
        if minimum > limit:  # only "auto" gets here: the machine has less than the run needs
            plan["warning"] = (f"the available memory ({_gb(limit)}) is below what even streaming needs "
                               f"(~{_gb(minimum)}): the run goes on and may exceed it")
    return plan


def open_store(cache, rows, device: torch.device, dtype: str, plan: dict, *, batch_size: int, eval_batch_size: int,
               flipped_rows=None):
    """The store `plan` chose over `rows`, and the flipped maps of `flipped_rows` (a CacheError for
    rows holding NaN or inf)."""
    if plan["mode"] == "resident":
        return ResidentFeatures(cache, rows, device, dtype, max_batch=max(batch_size, eval_batch_size),
                                flipped_rows=flipped_rows)
    return StreamingFeatures(cache, rows, device, dtype, flipped_rows=flipped_rows)


def describe_plan(plan: dict) -> str:
    """One line for the log."""
    flips = f" with {plan['flipped_rows']} training rows' flipped maps" if "flipped_rows" in plan else ""
    text = (f"features: {plan['mode']} (bank {_gb(plan['bank_bytes'])}{flips}, runtime {_gb(plan['runtime_bytes'])}, "
            f"working set ~{_gb(plan['working_bytes'])}, limit {_gb(plan['limit_bytes'])} from "
            f"{plan['limit_from']}: {plan['reason']})")
    return (text + (f"; {plan['capped']}" if "capped" in plan else "")
            + (f"; warning: {plan['warning']}" if "warning" in plan else ""))


def _gb(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.2f} GB"
