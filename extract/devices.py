"""Which torch device a command runs on: `auto` (CUDA when present, else CPU), cpu, cuda, cuda:N, mps.
Every command resolves `--device` here, so an unavailable device is one line, never a torch traceback."""
from __future__ import annotations

import torch

from cache.errors import UserError


class DeviceError(UserError, ValueError):
    """A device name torch does not know, or a device this machine lacks."""
    exit_code = 2  # a usage error, as click's own


def check_device(device) -> str:
    """`device` if this machine has it: auto, cpu, cuda, cuda:N or mps; else a DeviceError."""
    text = str(device)
    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceError(f"{text!r} is not a device: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{text!r}: CUDA is not available on this machine (use auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"numbered from 0")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"{text!r}: MPS is not available on this machine (use auto or cpu)")
    elif dev.type != "cpu":
        raise DeviceError(f"{text!r}: device type {dev.type!r} is not supported: expected auto, cpu, cuda or cuda:N")
    return text


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """auto = cuda if available, else cpu; an unknown or absent device is a DeviceError."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(check_device(device))
