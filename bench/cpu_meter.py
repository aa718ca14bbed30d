"""Tell whether a CPU timing was taken on a quiet machine (Linux /proc).

On a small shared machine another process's OpenMP threads can slow a 2-thread forward pass
several-fold, so every CPU number in bench/ comes with the share of the CPUs that *other*
processes used meanwhile, and benches can wait for a quiet moment before measuring.
"""
from __future__ import annotations

import os
import resource
import time


def _busy_and_total_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def _own_cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (e.g. a finished `msdn extract`)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class CpuMeter:
    """with CpuMeter() as m: ...; m.foreign_share = fraction of all CPUs used by other processes."""

    def __enter__(self):
        self._busy, self._total = _busy_and_total_jiffies()
        self._own, self._wall = _own_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy, total = _busy_and_total_jiffies()
        wall = time.perf_counter() - self._wall
        tick = os.sysconf("SC_CLK_TCK")
        cpus = os.cpu_count() or 1
        foreign = (busy - self._busy) / tick - (_own_cpu_seconds() - self._own)
        self.foreign_share = max(0.0, min(1.0, foreign / max(wall * cpus, 1e-9)))
        return False


def idle_share(seconds: float = 1.0) -> float:
    busy0, total0 = _busy_and_total_jiffies()
    time.sleep(seconds)
    busy1, total1 = _busy_and_total_jiffies()
    return 1.0 - (busy1 - busy0) / max(total1 - total0, 1)


def wait_until_idle(max_wait_s: float, min_idle: float = 0.9, log=print) -> float:
    """Sleep until the CPUs are >= min_idle idle over a 2 s window (or max_wait_s passes);
    returns the last idle share seen."""
    deadline = time.monotonic() + max_wait_s
    idle = idle_share(2.0)
    while idle < min_idle and time.monotonic() < deadline:
        log(f"  waiting for a quiet CPU (idle {idle:.0%})")
        time.sleep(10)
        idle = idle_share(2.0)
    return idle
