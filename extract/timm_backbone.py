"""`timm:<model>` backbones: the last feature stage of any timm model as the region map (stage 1).

    msdn extract --backbone timm:convnext_tiny --weights convnext_tiny.safetensors ...

- Features: `timm.create_model(model, features_only=True, out_indices=(-1,))`, the deepest stage timm
  reports in `feature_info` (a CNN's last stage, e.g. ResNet `layer4`; a ViT's last block). For
  vision transformers timm's feature wrapper keeps the patch tokens only (class and register tokens
  dropped) and lays them out as a (C, h, w) grid; a model whose features come channels-last
  (Swin) is permuted to (C, h, w). Models that take an `img_size` (ViT, Swin, ...) are built for
  the extraction's image size, so their position embeddings are resampled once, on load.
- Preprocessing: the model's pretrained config (`pretrained_cfg`, as
  `timm.data.resolve_data_config` reads it): mean, std, interpolation, and its crop: the shorter side
  resized to floor(S / crop_pct), then a centre crop of S (crop_mode "squash": both sides).
- Weights: `--weights FILE` (a state dict, .pth/.bin, or a .safetensors file, loaded through timm's
  own pretrained loader so its checkpoint filters apply), `imagenet` = the file in timm's local
  caches (Hugging Face hub cache, or torch hub's for URL weights), downloaded there by timm itself
  (`pretrained=True`) when it is missing and the machine is online ($HF_HUB_OFFLINE / `msdn extract
  --offline` forbid it), or `random` (tests only). A file neither cached nor downloadable is one
  BackboneWeightsError line naming the model and `--weights FILE` (extract/timm_weights.py).
- The manifest records the timm version, the model name, the weights' sha256 and the preprocessing.

timm is an optional extra: `pip install "msdn-zsl[timm]"`.
"""
from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torchvision.transforms as T
from torch import nn

from extract.backbone_weights import BackboneWeightsError, weights_record
from extract.timm_weights import INSTALL_HINT, TIMM_PREFIX, cached_weights, model_name, resolve_weights  # noqa: F401
from extract.timm_weights import import_timm as _import_timm

def check_timm_model(model: str) -> None:
    """ValueError in one line unless timm is installed, knows `model` (and its pretrained tag, if
    it has one) and gives it feature stages."""
    backbone = TIMM_PREFIX + model
    timm = _import_timm(backbone)
    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else " (timm.list_models() lists them)"
        raise ValueError(f"{backbone}: timm {timm.__version__} has no model {model!r}{hint}")
    try:
        known_tag = timm.models.get_pretrained_cfg(model) is not None or "." not in model
    except RuntimeError:  # timm raises for a tag its architecture lacks
        known_tag = False
    if not known_tag:
        tags = timm.list_pretrained(model.split(".", 1)[0] + ".*")
        raise ValueError(f"{backbone}: unknown pretrained tag; timm knows {', '.join(tags) or 'none for it'}")
    _layout(model, 224)


@dataclass(frozen=True)
class Layout:
    channels: int
    height: int
    width: int
    channels_last: bool  # the feature wrapper returns (B, H, W, C) (Swin): permuted to (B, C, H, W)
    module: str          # feature_info's name of the stage
    reduction: int


def _create(model: str, image_size: int, **kwargs) -> nn.Module:
    """timm's feature-stage model for `image_size`: models that take `img_size` (ViT, Swin, ...)
    get it; the others (CNNs) do not accept it."""
    timm = _import_timm(TIMM_PREFIX + model)
    kwargs = dict(kwargs, features_only=True, out_indices=(-1,))
    try:
        return timm.create_model(model, img_size=image_size, **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
    return timm.create_model(model, **kwargs)


@lru_cache(maxsize=64)
def _layout(model: str, image_size: int) -> Layout:
    """Shape of the last feature stage, from a forward on the meta device (no memory, no compute)."""
    backbone = TIMM_PREFIX + model
    try:
        with torch.device("meta"):
            net = _create(model, image_size, pretrained=False)
            out = net(torch.empty(1, 3, image_size, image_size))[-1]
    except (RuntimeError, AssertionError, ValueError, NotImplementedError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{backbone}: timm cannot give this model's feature stages at {image_size} px "
                         f"({first})") from None
    info = net.feature_info.get_dicts()[-1]
    channels = int(info["num_chs"])
    if out.dim() != 4:
        raise ValueError(f"{backbone}: its last feature stage is not a 2-D map (shape {tuple(out.shape)})")
    channels_last = out.shape[1] != channels and out.shape[-1] == channels
    height, width = (out.shape[1], out.shape[2]) if channels_last else (out.shape[2], out.shape[3])
    return Layout(channels, int(height), int(width), channels_last, str(info.get("module", "")),
                  int(info.get("reduction", 0)))


def feature_shape(spec) -> tuple[int, int, int]:
    layout = _layout(model_name(spec.name), spec.image_size)
    return layout.channels, layout.height, layout.width


@dataclass(frozen=True)
class Preprocessing:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    crop_mode: str
    native_resolution: int

    def resize_side(self, image_size: int) -> int:
        return math.floor(image_size / self.crop_pct)  # as timm's eval transform


@lru_cache(maxsize=64)
def preprocessing(model: str) -> Preprocessing:
    """Mean, std, interpolation and crop of the model's pretrained config (timm's defaults when it
    has none)."""
    timm = _import_timm(TIMM_PREFIX + model)
    cfg = timm.models.get_pretrained_cfg(model)
    config = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {})
    return Preprocessing(mean=tuple(float(v) for v in config["mean"]), std=tuple(float(v) for v in config["std"]),
                         interpolation=str(config["interpolation"]), crop_pct=float(config["crop_pct"]),
                         crop_mode=str(config.get("crop_mode", "center")),
                         native_resolution=int(config["input_size"][-1]))


def build_transform_steps(spec) -> list:
    """Resize + crop as the model's pretrained config asks (before ToTensor / normalisation)."""
    pre = preprocessing(model_name(spec.name))
    side = pre.resize_side(spec.image_size)
    mode = T.InterpolationMode(pre.interpolation)
    size = (side, side) if pre.crop_mode == "squash" else side
    return [T.Resize(size, interpolation=mode, antialias=True), T.CenterCrop(spec.image_size)]


def _crop_record(pre: Preprocessing, image_size: int) -> dict:
    side = pre.resize_side(image_size)
    return {"resize": side if pre.crop_mode != "squash" else [side, side],
            "resize_interpolation": f"{pre.interpolation} (antialias)",
            "crop": f"center {image_size}", "crop_pct": pre.crop_pct,
            "crop_mode": pre.crop_mode if pre.crop_mode in ("center", "squash") else
            f"center (timm's {pre.crop_mode!r} mode is not reproduced)"}


def _classifier_names(model: str) -> tuple[str, ...]:
    timm = _import_timm(TIMM_PREFIX + model)
    cfg = timm.models.get_pretrained_cfg(model)
    names = getattr(cfg, "classifier", None) if cfg is not None else None
    return (names,) if isinstance(names, str) else tuple(names or ())


class TimmFeatures(nn.Module):
    """(B, 3, S, S) -> (B, C, h, w): timm's last feature stage, always channels-first."""

    def __init__(self, net: nn.Module, layout: Layout):
        super().__init__()
        self.net = net
        self.channels_last_output = layout.channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.net(images)[-1]
        return maps.permute(0, 3, 1, 2) if self.channels_last_output else maps


def build_features(spec) -> nn.Module:
    """Eval-mode feature module with the weights `spec` asks for (random init seeded)."""
    model = model_name(spec.name)
    layout = _layout(model, spec.image_size)
    path = resolve_weights(spec)
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = _create(model, spec.image_size, pretrained=False)
    else:
        with _KeyMismatches() as mismatches:
            try:
                # timm's own loader: safetensors or torch (weights_only) files, its checkpoint filters
                # (e.g. a ViT's position embeddings resampled to img_size).
                net = _create(model, spec.image_size, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
            except Exception as err:  # torch, safetensors and timm each raise their own types
                lines = [line.strip() for line in str(err).splitlines() if line.strip()]
                detail = next((line for line in lines if not line.startswith("Error(s) in loading")),
                              type(err).__name__)
                raise BackboneWeightsError(f"{path}: not weights timm can load into {model} ({detail[:200]})") from None
        problem = mismatches.problem(_classifier_names(model))
        if problem:
            raise BackboneWeightsError(f"{path}: not weights timm can load into {model} ({problem})")
    return TimmFeatures(net, layout).requires_grad_(False).eval()


class _KeyMismatches(logging.Handler):
    """For a feature model timm loads weights with strict=False (the classifier is dropped) and only
    logs missing and unexpected keys: a file of another model would load nothing and leave the
    random init. Collect those log lines so that a mismatch is an error."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self._logger = logging.getLogger("timm.models._builder")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for start, keys in (("Missing keys (", self.missing), ("Unexpected keys (", self.unexpected)):
            if message.startswith(start):
                keys.extend(message[len(start):message.find(")")].split(", "))

    def problem(self, classifiers: tuple[str, ...]) -> str:
        """'' when every weight of the features loaded (the classifier, which timm drops from the
        file for a feature model, may be missing); else which keys did not match."""
        missing = [k for k in self.missing if not k.startswith(tuple(c + "." for c in classifiers))]
        if not missing and not self.unexpected:
            return ""
        parts = [f"{len(keys)} {kind} keys, e.g. {keys[0]}" for kind, keys in
                 (("missing", missing), ("unexpected", self.unexpected)) if keys]
        return "; ".join(parts)

    def __enter__(self) -> "_KeyMismatches":
        self._level = self._logger.level
        self._logger.setLevel(logging.INFO)
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)


def describe(spec, download: bool | None = None) -> dict:
    """The backbone record for the manifest (same keys as the built-in backbones' plus timm's)."""
    timm = _import_timm(spec.name, BackboneWeightsError)
    model = model_name(spec.name)
    path = resolve_weights(spec, download)
    layout = _layout(model, spec.image_size)
    pre = preprocessing(model)
    return {
        **weights_record(spec, path, "timm local cache"),
        "timm_model": model,
        "timm_version": timm.__version__,
        "output_layer": f"timm features_only, out_indices=(-1,): {layout.module} (stride {layout.reduction})",
        "native_resolution": pre.native_resolution,
        "preprocessing": {"convert": "RGB", **_crop_record(pre, spec.image_size),
                          "normalization": "timm pretrained_cfg mean/std",
                          "mean": list(pre.mean), "std": list(pre.std)},
        "channels": layout.channels,
        "grid": [layout.height, layout.width],
    }
