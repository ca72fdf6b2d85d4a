"""The landmark hourglass: image ``(B, C, S, S)`` -> 68 landmark heatmaps per stack ``(B, stacks, 68, S, S)``.

Stacked hourglasses WITH intermediate supervision (Newell et al. 2016; FAN, Bulat and Tzimiropoulos
2017, the detector of the VRN paper): the VRN stem to quarter resolution, then per stack an
hourglass (with its residual and 1x1 conv+BN+ReLU blocks) and a 1x1 head predicting the heatmaps
at quarter resolution; features and heatmaps are merged back into the next stack's input by 1x1
convs. Every stack's heatmaps are upsampled bilinearly to the crop, where the loss supervises them.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_vrn.landmark_scheme import NUM_LANDMARKS
from lightning_vrn.nets.hourglass import HourglassStack
from lightning_vrn.nets.vrn import ConvHead, HeadFactory, Stem, upsample


class LandmarkNet(nn.Module):
    """``(B, in_channels, S, S)`` image -> ``(B, stacks, num_landmarks, S, S)`` heatmaps, one set per stack.

    ``S`` must be divisible by ``4 * 2 ** hourglass_depth`` (192 for depth 4 -> 48x48 hourglasses).
    ``head``: each stack's heatmap head (:data:`lightning_vrn.nets.vrn.HeadFactory`).
    """

    def __init__(self, num_landmarks: int = NUM_LANDMARKS, in_channels: int = 3, features: int = 256,
                 stacks: int = 2, hourglass_depth: int = 4, head: HeadFactory = ConvHead):
        super().__init__()
        if stacks < 1:
            raise ValueError(f"need at least one hourglass stack, got {stacks}")
        self.stem = Stem(in_channels, features)
        self.hourglasses = nn.ModuleList(HourglassStack(1, features, hourglass_depth) for _ in range(stacks))
        self.heads = nn.ModuleList(head(features, num_landmarks) for _ in range(stacks))
        self.merge_features = nn.ModuleList(nn.Conv2d(features, features, 1) for _ in range(stacks - 1))
        self.merge_heatmaps = nn.ModuleList(nn.Conv2d(num_landmarks, features, 1) for _ in range(stacks - 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, S, S) -> (B, stacks, num_landmarks, S, S)``; the last stack's are the prediction."""
        if image.ndim != 4 or image.shape[1] != self.stem.conv[0].in_channels:
            raise ValueError(
                f"LandmarkNet expects (B, {self.stem.conv[0].in_channels}, S, S) input, got {tuple(image.shape)}"
            )
        x = self.stem(image)
        per_stack = []
        for i, (hourglass, head) in enumerate(zip(self.hourglasses, self.heads)):
            features = hourglass(x)
            heatmaps = head(features)  # quarter resolution, merged into the next stack
            per_stack.append(upsample(heatmaps, image.shape[-2:]))
            if i < len(self.merge_features):
                x = x + self.merge_features[i](features) + self.merge_heatmaps[i](heatmaps)
        return torch.stack(per_stack, dim=1)
