"""The VRN network (docs/paper.md, "Network"): image ``(B, C, S, S)`` -> volume logits ``(B, D, S, S)``.

Stem (quarter resolution) -> stacked hourglasses -> head to D depth slices -> bilinear x4. The head is a
constructor argument (:data:`HeadFactory`; the paper's is :class:`ConvHead`, a 1x1 convolution), so another
head is another class, not another network.
With the paper settings (S = 192, D = 200, features 256, 2 stacks of depth 4) the hourglasses
run at 48x48. The blocks are separate so that VRN-Multitask (a shared hourglass forking into a
volume branch and a landmark branch) and the Guided landmark hourglass reuse them.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_vrn.nets.hourglass import HourglassStack, Residual, conv_bn_relu


class Stem(nn.Module):
    """Image ``(B, in_channels, S, S)`` -> features ``(B, features, S/4, S/4)``.

    7x7 stride-2 conv to ``features/4`` + BN + ReLU, residual to ``features/2``, 2x2 max-pool,
    residual ``features/2 -> features/2``, residual to ``features`` (paper: 3 -> 64 -> 128 -> 128 -> 256).
    """

    def __init__(self, in_channels: int, features: int):
        super().__init__()
        if features % 4:
            raise ValueError(f"features must be divisible by 4 (the stem widths are features/4 and /2), got {features}")
        quarter, half = features // 4, features // 2
        self.conv = conv_bn_relu(in_channels, quarter, kernel_size=7, stride=2)
        self.res1 = Residual(quarter, half)
        self.pool = nn.MaxPool2d(2)
        self.res2 = Residual(half, half)
        self.res3 = Residual(half, features)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, S, S) -> (B, features, S/4, S/4)``."""
        return self.res3(self.res2(self.pool(self.res1(self.conv(image)))))


class ConvHead(nn.Module):
    """The paper's head: features ``(B, features, h, w)`` -> logits ``(B, out_channels, h, w)`` by a 1x1 convolution."""

    def __init__(self, features: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(features, out_channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(features)


HeadFactory = Callable[[int, int], nn.Module]
"""``(features, out_channels) -> head``: a module mapping ``(B, features, h, w)`` to ``(B, out_channels, h, w)``
at the hourglasses' resolution (the networks upsample its output to the crop)."""


def upsample(logits: torch.Tensor, size) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, C, *size)`` by bilinear interpolation (4x in VRN: quarter resolution to the crop)."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class VRNNet(nn.Module):
    """VRN: ``(B, in_channels, S, S)`` image -> ``(B, out_channels, S, S)`` occupancy logits.

    ``out_channels`` is the grid depth D (one channel per depth slice). ``S`` must be divisible
    by ``4 * 2 ** hourglass_depth`` (192 for depth 4 -> 48x48 hourglasses; 96 for depth 3).
    ``head``: builds the head from ``(features, out_channels)`` (:data:`HeadFactory`).
    """

    def __init__(self, out_channels: int, in_channels: int = 3, features: int = 256, stacks: int = 2,
                 hourglass_depth: int = 4, head: HeadFactory = ConvHead):
        super().__init__()
        self.stem = Stem(in_channels, features)
        self.hourglasses = HourglassStack(stacks, features, hourglass_depth)
        self.head = head(features, out_channels)

    def forward(self, image: torch.Tensor, upsample_volume: bool = True) -> torch.Tensor:
        """``(B, in_channels, S, S) -> (B, out_channels, S, S)`` logits; ``upsample_volume=False``: the head's
        ``(B, out_channels, S/4, S/4)``, before the bilinear x4 (for a loss that upsamples them itself,
        :mod:`lightning_vrn.nets.upsampled_bce`)."""
        if image.ndim != 4 or image.shape[1] != self.stem.conv[0].in_channels:
            raise ValueError(
                f"VRNNet expects (B, {self.stem.conv[0].in_channels}, S, S) input, got {tuple(image.shape)}"
            )
        logits = self.head(self.hourglasses(self.stem(image)))
        return upsample(logits, image.shape[-2:]) if upsample_volume else logits


class MultitaskNet(nn.Module):
    """VRN-Multitask: ``(B, in_channels, S, S)`` -> volume logits ``(B, out_channels, S, S)`` and 68 landmark heatmaps.

    Three hourglasses: a shared one (merged back into the stem's features with a 1x1 conv, as
    between stacked hourglasses), then a fork of two, one feeding the volume head and one the
    landmark head (``head``, like :class:`VRNNet`'s), both upsampled bilinearly to the crop.
    """

    def __init__(self, out_channels: int, num_landmarks: int, in_channels: int = 3, features: int = 256,
                 hourglass_depth: int = 4, head: HeadFactory = ConvHead):
        super().__init__()
        self.stem = Stem(in_channels, features)
        self.shared = HourglassStack(1, features, hourglass_depth)
        self.merge = nn.Conv2d(features, features, 1)
        self.volume_branch = HourglassStack(1, features, hourglass_depth)
        self.landmark_branch = HourglassStack(1, features, hourglass_depth)
        self.volume_head = head(features, out_channels)
        self.landmark_head = head(features, num_landmarks)

    def forward(self, image: torch.Tensor, upsample_volume: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, in_channels, S, S)`` -> ``(volume logits (B, out_channels, S, S), heatmaps (B, num_landmarks, S, S))``;
        ``upsample_volume=False``: the volume logits before the bilinear x4, ``(B, out_channels, S/4, S/4)``."""
        features = self.stem(image)
        shared = features + self.merge(self.shared(features))
        size = image.shape[-2:]
        volume_logits = self.volume_head(self.volume_branch(shared))
        return (upsample(volume_logits, size) if upsample_volume else volume_logits,
                upsample(self.landmark_head(self.landmark_branch(shared)), size))
