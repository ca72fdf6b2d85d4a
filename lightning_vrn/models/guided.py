"""VRN-Guided: the RGB crop stacked with 68 Gaussian landmark maps in, the volume out.

Training and the upper-bound evaluation guide with maps made from the ground-truth landmarks (the
batch's ``heatmaps``, made by the DataModule after augmentation, at :attr:`VRNGuided.heatmap_sigma`).
The realistic evaluation guides with a separately trained landmark detector's predictions:
:class:`DetectedGuidance` pairs a guided model with a detector without tying either checkpoint to
the other. The guidance-sigma ablation is the same model with wider maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import pytorch_lightning as pl
import torch

from lightning_vrn.heatmaps import HeatmapSettings, gaussian_heatmaps
from lightning_vrn.landmark_scheme import NUM_LANDMARKS
from lightning_vrn.models.base import register
from lightning_vrn.models.volume import VolumeSettings, occupancy
from lightning_vrn.models.vrn import VRN


@dataclass
class GuidedSettings(HeatmapSettings, VolumeSettings):
    """VRN settings plus ``sigma_px``: the guidance maps' Gaussian sigma in pixels of the crop."""


@register("vrn_guided")
class VRNGuided(VRN):
    """VRN whose input is the normalised RGB crop and 68 landmark maps: ``(B, 3 + 68, S, S)``."""

    Settings = GuidedSettings
    input_channels = 3 + NUM_LANDMARKS

    def network_inputs(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(B, 71, S, S)``: the normalised image, then ``batch["heatmaps"]`` (68 maps, peak 1)."""
        heatmaps = batch.get("heatmaps")
        if heatmaps is None or tuple(heatmaps.shape[1:]) != (NUM_LANDMARKS, self.grid.height, self.grid.width):
            shape = None if heatmaps is None else tuple(heatmaps.shape)
            raise ValueError(f"{type(self).__name__} needs batch['heatmaps'] of shape (B, {NUM_LANDMARKS}, "
                             f"{self.grid.height}, {self.grid.width}), got {shape}: build the DataModule with "
                             f"heatmap_sigma=model.heatmap_sigma, or wrap the model in DetectedGuidance")
        return torch.cat([self.normalised_image(batch), heatmaps.to(batch["image"].dtype)], dim=1)


@dataclass
class GuidedSigma2Settings(GuidedSettings):
    """The guidance-sigma ablation: maps (and its detector's targets) of sigma 2 px."""

    sigma_px: float = 2.0


@register("vrn_guided_sigma2")
class VRNGuidedSigma2(VRNGuided):
    """VRN-Guided with sigma 2 guidance maps (the paper reports a negligible drop)."""

    Settings = GuidedSigma2Settings


class DetectedGuidance(pl.LightningModule):
    """A guided model evaluated on the landmarks a detector predicts, not the ground truth's.

    ``guided``: a :class:`VRNGuided`; ``detector``: any module with ``landmarks(batch) -> (B, 68, 2)``
    crop pixels (:class:`lightning_vrn.models.landmark_hourglass.LandmarkHourglass`). Its test step returns
    the volume logits and the detected landmarks, so the NME callback scores it like any model.
    """

    def __init__(self, guided: VRNGuided, detector: torch.nn.Module):
        super().__init__()
        self.guided, self.detector = guided, detector
        self.grid, self.target_frame = guided.grid, guided.target_frame

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"volume_logits": (B, D, H, W), "landmarks": (B, 68, 2)}`` guided by the detected landmarks."""
        landmarks = self.detector.landmarks(batch)
        heatmaps = gaussian_heatmaps(landmarks, self.grid.height, self.grid.width, self.guided.heatmap_sigma)
        return {**self.guided({**batch, "heatmaps": heatmaps}), "landmarks": landmarks}

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self(batch)

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int = 0) -> torch.Tensor:
        return occupancy(self(batch)["volume_logits"])
