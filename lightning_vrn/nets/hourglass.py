"""Stacked-hourglass building blocks (Newell et al. 2016), as in the released VRN model.

All blocks map ``(B, C, H, W)`` feature maps to feature maps of the same spatial size:

- :class:`Residual`: pre-activation bottleneck (BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1,
  ``out -> out/2 -> out/2 -> out``), identity skip, or a 1x1 conv skip when the width changes.
- :class:`Hourglass`: recursive encoder-decoder; each level max-pools by 2 and upsamples back by
  nearest-neighbour, adding a full-resolution residual branch.
- :class:`HourglassStack`: ``stacks`` hourglasses chained without intermediate supervision; after
  each hourglass a residual and two 1x1 conv+BN+ReLU, then the usual 1x1 merge into the next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1) -> nn.Sequential:
    """Conv (same padding) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Residual(nn.Module):
    """Pre-activation bottleneck residual ``in_channels -> out_channels``; keeps H and W."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"residual width must be even (the bottleneck is half of it), got {out_channels}")
        mid = out_channels // 2
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, mid, 1),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 1),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in, H, W) -> (B, out, H, W)``."""
        return self.skip(x) + self.body(x)


class Hourglass(nn.Module):
    """Hourglass of ``depth`` levels on ``features`` channels: ``3 * depth + 1`` residuals.

    The input's H and W must be divisible by ``2 ** depth``.
    """

    def __init__(self, depth: int, features: int):
        super().__init__()
        if depth < 1:
            raise ValueError(f"hourglass depth must be >= 1, got {depth}")
        self.depth = depth
        self.skip = Residual(features, features)
        self.down = Residual(features, features)
        self.inner = Hourglass(depth - 1, features) if depth > 1 else Residual(features, features)
        self.up = Residual(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, F, H, W) -> (B, F, H, W)``."""
        height, width = x.shape[-2:]
        if height % 2**self.depth or width % 2**self.depth:
            raise ValueError(
                f"hourglass of depth {self.depth} needs feature maps divisible by {2**self.depth}, got "
                f"{height}x{width}; use an input size divisible by {4 * 2**self.depth} or a smaller hourglass_depth"
            )
        low = self.up(self.inner(self.down(F.max_pool2d(x, 2))))
        return self.skip(x) + F.interpolate(low, scale_factor=2, mode="nearest")


class HourglassStack(nn.Module):
    """``stacks`` hourglasses of ``depth`` levels chained by 1x1 feature merges (no intermediate supervision)."""

    def __init__(self, stacks: int, features: int, depth: int):
        super().__init__()
        if stacks < 1:
            raise ValueError(f"need at least one hourglass stack, got {stacks}")
        self.hourglasses = nn.ModuleList(
            nn.Sequential(
                Hourglass(depth, features),
                Residual(features, features),
                conv_bn_relu(features, features),
                conv_bn_relu(features, features),
            )
            for _ in range(stacks)
        )
        self.merges = nn.ModuleList(nn.Conv2d(features, features, 1) for _ in range(stacks - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, F, H, W)`` -> features of the last stack ``(B, F, H, W)``."""
        for hourglass, merge in zip(self.hourglasses[:-1], self.merges):
            x = x + merge(hourglass(x))
        return self.hourglasses[-1](x)
