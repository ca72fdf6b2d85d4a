"""VRN-Multitask: one shared hourglass forking into a volume branch and a 68-landmark heatmap branch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from lightning_vrn.heatmaps import HeatmapRegressionSettings, heatmap_loss
from lightning_vrn.landmark_scheme import NUM_LANDMARKS
from lightning_vrn.models.base import register
from lightning_vrn.models.landmark_hourglass import LandmarkScoring
from lightning_vrn.models.volume import VolumeRegressionModule, VolumeSettings, volume_output
from lightning_vrn.nets.vrn import MultitaskNet


@dataclass
class MultitaskNetSettings:
    """The three hourglasses' width and depth (their number is fixed: one shared, a fork of two)."""

    features: int = 256
    hourglass_depth: int = 4


@dataclass
class MultitaskSettings(HeatmapRegressionSettings, VolumeSettings):
    """``sigma_px``: the heatmap targets' sigma in pixels of the crop; ``landmark_weight``: the heatmap MSE's weight in the loss."""

    net: MultitaskNetSettings = field(default_factory=MultitaskNetSettings)
    landmark_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.landmark_weight < 0:
            raise ValueError(f"model.landmark_weight must be >= 0, got {self.landmark_weight}")


@register("vrn_multitask")
class VRNMultitask(LandmarkScoring, VolumeRegressionModule):
    """Volume and landmarks from one network; loss = volume BCE + ``landmark_weight`` x heatmap MSE."""

    Settings = MultitaskSettings

    def build_network(self) -> nn.Module:
        net = self.settings.net
        return MultitaskNet(out_channels=self.grid.depth, num_landmarks=NUM_LANDMARKS, in_channels=self.input_channels,
                            features=net.features, hourglass_depth=net.hourglass_depth)

    def forward(self, batch: Mapping[str, torch.Tensor], upsample_volume: bool = True) -> dict[str, torch.Tensor]:
        """``{"volume_logits": (B, D, S, S), "heatmaps": (B, 68, S, S)}``; ``upsample_volume=False``: the volume
        logits before the bilinear x4, ``(B, D, S/4, S/4)``, under another key (:func:`volume_output`)."""
        self.check_batch(batch)
        volume_logits, heatmaps = self.run_network(self.network_inputs(batch), upsample_volume)
        return {**volume_output(volume_logits, upsample_volume), "heatmaps": heatmaps}

    def losses(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``volume_bce``, ``heatmap_mse`` (mean over maps and pixels, foreground-weighted when the settings say
        so) and their weighted sum ``loss``."""
        volume_bce = super().losses(outputs, batch)["volume_bce"]
        heatmap_mse = heatmap_loss(outputs["heatmaps"], batch["heatmaps"], self.settings.foreground_weight)
        return {"loss": volume_bce + self.settings.landmark_weight * heatmap_mse, "volume_bce": volume_bce,
                "heatmap_mse": heatmap_mse}

    def update_metrics(self, stage: str, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> None:
        """Voxel IoU, and in validation and test the landmark NME of the decoded heatmaps."""
        super().update_metrics(stage, outputs, batch)
        self.update_landmark_nme(stage, outputs["heatmaps"], batch)
