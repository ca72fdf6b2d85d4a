"""The landmark hourglass: RGB crop -> 68 landmark heatmaps, the detector VRN-Guided and the 3DMM fit use.

Trained on its own with MSE against Gaussian heatmaps of the (augmented) ground-truth landmarks,
``sigma_px`` pixels (the batch's ``"heatmaps"``, made by the DataModule at
:attr:`LandmarkHourglass.heatmap_sigma`), every stack supervised. Landmarks are the last stack's
heatmaps decoded with sub-pixel refinement (:func:`lightning_vrn.heatmaps.decode_heatmaps`);
validation and test log the AFLW2000-3D landmark NME (:class:`~lightning_vrn.metrics.landmark_nme.LandmarkNME`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from lightning_vrn.heatmaps import HeatmapRegressionSettings, decode_heatmaps, heatmap_loss
from lightning_vrn.metrics.landmark_nme import LandmarkNME
from lightning_vrn.models.base import ModelSettings, VRNModule, register
from lightning_vrn.models.volume import NetSettings
from lightning_vrn.nets.landmark_net import LandmarkNet


REANNOTATED = "landmarks_2d_reannotated"
"""Batch key of the second landmark ground truth (AFLW2000-3D's re-annotation), when the file has one."""


class LandmarkScoring:
    """For a model whose outputs hold ``"heatmaps"`` (B, 68, S, S): the landmark NME of the decoded maps in
    validation and test (logged at the epoch end as ``{stage}/landmark_nme``, ``_yaw_{lo}_{hi}`` and
    ``_balanced``; against ``batch["landmarks_2d_reannotated"]`` too when the batches carry it, as
    ``{stage}/landmark_nme_reannotated``, ...) and :meth:`landmarks`. Put it before the LightningModule base class.

    ``test_landmark_table``: the last test's per-sample landmark NMEs against the original landmarks
    (:meth:`~lightning_vrn.metrics.landmark_nme.LandmarkNME.per_sample`: ``index``, ``yaw_deg``, ``landmark_nme``),
    None before a test."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.val_landmark_nme, self.test_landmark_nme = LandmarkNME(), LandmarkNME()
        self.val_landmark_nme_reannotated = LandmarkNME("landmark_nme_reannotated")
        self.test_landmark_nme_reannotated = LandmarkNME("landmark_nme_reannotated")
        self.test_landmark_table: dict[str, np.ndarray] | None = None

    def update_landmark_nme(self, stage: str, heatmaps: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        """Validation and test: add the decoded ``heatmaps`` against the batch's ground-truth landmarks (both sets)."""
        if stage in ("val", "test"):
            landmarks = decode_heatmaps(heatmaps)
            yaw, index = batch["pose"][:, 1], batch["index"]
            getattr(self, f"{stage}_landmark_nme").update(landmarks, batch["landmarks_2d"], yaw, index)
            if REANNOTATED in batch:
                getattr(self, f"{stage}_landmark_nme_reannotated").update(landmarks, batch[REANNOTATED], yaw, index)

    def on_validation_epoch_end(self) -> None:
        self._log_landmark_nme("val")

    def on_test_epoch_end(self) -> None:
        self._log_landmark_nme("test")

    def _log_landmark_nme(self, stage: str) -> None:
        """Log ``{stage}/landmark_nme``, ``_yaw_{lo}_{hi}`` and ``_balanced`` (and the ``_reannotated`` ones),
        then reset the metrics; a test keeps its per-sample values in :attr:`test_landmark_table`."""
        if stage == "test":
            self.test_landmark_table = None
            if self.test_landmark_nme.update_count:
                with self.test_landmark_nme.sync_context():  # every process's samples, as compute() gathers them
                    self.test_landmark_table = self.test_landmark_nme.per_sample()
        for metric in (getattr(self, f"{stage}_landmark_nme"), getattr(self, f"{stage}_landmark_nme_reannotated")):
            if metric.update_count:
                for name, value in metric.compute().items():  # already gathered over processes
                    self.log(f"{stage}/{name}", value, prog_bar=name == "landmark_nme")
            metric.reset()

    @torch.no_grad()
    def landmarks(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(B, 68, 2)`` float32 crop-pixel landmarks of ``batch["image"]``, predicted in eval mode (then restored)."""
        was_training = self.training
        self.eval()
        try:
            return decode_heatmaps(self(batch)["heatmaps"])
        finally:
            self.train(was_training)


@dataclass
class LandmarkSettings(HeatmapRegressionSettings, ModelSettings):
    """``net``: the stacked hourglass (FAN-like defaults: 2 stacks, 256 features, depth 4); ``sigma_px``:
    the target heatmaps' Gaussian sigma in pixels of the crop."""

    net: NetSettings = field(default_factory=NetSettings)


@register("landmark_hourglass")
class LandmarkHourglass(LandmarkScoring, VRNModule):
    """Stacked hourglasses with intermediate supervision regressing 68 landmark heatmaps on the grid's crop."""

    Settings = LandmarkSettings

    def __init__(self, grid, **settings):
        super().__init__(grid, **settings)
        net = self.settings.net
        self.net = LandmarkNet(features=net.features, stacks=net.stacks, hourglass_depth=net.hourglass_depth)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"heatmaps": (B, 68, S, S)`` of the last stack, ``"heatmaps_per_stack": (B, stacks, 68, S, S)}``."""
        self.check_image(batch)
        per_stack = self.net(self.normalised_image(batch))
        return {"heatmaps": per_stack[:, -1], "heatmaps_per_stack": per_stack}

    def losses(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``loss``: the sum over stacks of the heatmap MSE (mean over maps and pixels, foreground-weighted when
        the settings say so); ``heatmap_mse``: the last stack's."""
        if "heatmaps" not in batch:
            raise KeyError("the landmark hourglass trains on batch['heatmaps']: build the DataModule with "
                           "heatmap_sigma=model.heatmap_sigma")
        per_stack = heatmap_loss(outputs["heatmaps_per_stack"], batch["heatmaps"], self.settings.foreground_weight)
        return {"loss": per_stack.sum(), "heatmap_mse": per_stack[-1]}

    def update_metrics(self, stage: str, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> None:
        """Validation and test: landmark NME of the decoded last-stack heatmaps (logged at the epoch end)."""
        self.update_landmark_nme(stage, outputs["heatmaps"], batch)

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int = 0) -> torch.Tensor:
        """``(B, 68, 2)`` decoded landmarks in crop pixels."""
        return self.landmarks(batch)
