"""Which autocast precision a run uses, and why: bf16 only pays where the hardware computes it.

On a CPU, bfloat16 matmuls are fast only with native instructions (x86: AVX512-BF16 or AMX-BF16;
Arm: the BF16 extension). Without them oneDNN converts to float32 and back around each product,
and bf16 autocast runs several times slower than float32 (figures: docs/speed.md, "CPU threads on shared
machines" and "Training speed").

Detection reads the CPU flags the kernel reports (/proc/cpuinfo). MSDN_CPU_BF16=native|emulated
overrides it (a CPU that hides its flags in a VM, or a test forcing either answer).
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import torch

from pipeline.config import ConfigError

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512/AMX; Arm's "Features: ... bf16"
FORCE_ENV = "MSDN_CPU_BF16"
EMULATED_BF16_COST = ("bf16 autocast without native CPU support is emulated: measured 6x slower than "
                      "float32 on an AVX2-only CPU (matmul 18-20 vs 136-168 GFLOP/s)")


class SlowPrecisionWarning(UserWarning):
    """The asked precision works but runs slower than float32 on this hardware."""


@dataclass(frozen=True)
class CpuBf16:
    native: bool
    evidence: str   # what decided it: the flag found, "no bf16 flag", or the override

    def describe(self) -> str:
        return f"{'native' if self.native else 'emulated'} ({self.evidence})"


def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    flags: set[str] = set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    return flags


@functools.lru_cache(maxsize=None)
def _detected() -> CpuBf16:
    found = [flag for flag in NATIVE_BF16_FLAGS if flag in _cpu_flags()]
    capability = torch.backends.cpu.get_cpu_capability()
    if found:
        return CpuBf16(True, f"CPU flag {found[0]}, torch CPU capability {capability}")
    return CpuBf16(False, f"no avx512_bf16/amx_bf16/bf16 CPU flag, torch CPU capability {capability}")


def cpu_bf16(force: str | None = None) -> CpuBf16:
    """Native bf16 on this CPU? `force` (or $MSDN_CPU_BF16) = "native" | "emulated" overrides detection."""
    force = force or os.environ.get(FORCE_ENV) or None
    if force is None:
        return _detected()
    if force not in ("native", "emulated"):
        raise ConfigError(f"${FORCE_ENV} must be 'native' or 'emulated', got {force!r}")
    return CpuBf16(force == "native", f"forced by {FORCE_ENV}={force}")


@dataclass(frozen=True)
class AmpChoice:
    requested: str
    amp: str        # "bf16" | "fp16" | "none": what the run uses
    reason: str

    def to_dict(self) -> dict:
        return {"requested": self.requested, "amp": self.amp, "reason": self.reason}


def choose_amp(requested: str, device: torch.device, force_cpu_bf16: str | None = None) -> AmpChoice:
    """"auto": bf16 autocast on a CUDA device with bf16 (no loss scaling needed), float32 on CPU.
    CPU bf16 stays opt-in (--set amp=bf16): even with native AVX512-BF16 it moved the demo's test
    ZSL by 0.8 points against float32 (2 of 256 images), more than the 0.5 we accept for a default;
    on CUB-100 it moved ZSL by 0.00 and H by 0.05 and trained 1.8x faster. An explicit bf16 on a CPU
    without native bf16 is kept (the user asked) but warns with the measured cost."""
    if device.type == "cuda":
        if requested != "auto":
            return AmpChoice(requested, requested, "asked")
        if torch.cuda.is_bf16_supported():
            return AmpChoice(requested, "bf16", "auto: this CUDA device supports bf16")
        return AmpChoice(requested, "none", "auto: this CUDA device has no bf16")
    hardware = cpu_bf16(force_cpu_bf16) if device.type == "cpu" else None
    if requested == "auto":
        note = f"; CPU bf16 {hardware.describe()}" if hardware else ""
        return AmpChoice(requested, "none", f"auto: float32 off CUDA (CPU bf16 is opt-in: --set amp=bf16){note}")
    if requested == "bf16" and hardware is not None and not hardware.native:
        reason = f"asked; CPU bf16 {hardware.describe()}: {EMULATED_BF16_COST}"
        warnings.warn(f"amp=bf16 on this CPU: {reason}; --set amp=none (float32) is faster here",
                      SlowPrecisionWarning, stacklevel=2)
        return AmpChoice(requested, "bf16", reason)
    note = f"; CPU bf16 {hardware.describe()}" if hardware and requested == "bf16" else ""
    return AmpChoice(requested, requested, f"asked{note}")
