"""VRN: RGB image -> occupancy volume with two stacked hourglasses (no intermediate supervision); the no-alignment ablation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from lightning_vrn.models.base import register
from lightning_vrn.models.volume import VolumeRegressionModule, VolumeSettings
from lightning_vrn.nets.vrn import ConvHead, VRNNet


@register("vrn")
class VRN(VolumeRegressionModule):
    """The plain VRN of Jackson et al. (2017): the normalised RGB crop in, D depth-slice logits out."""

    def build_network(self) -> nn.Module:
        """:class:`VRNNet` with ``self.grid.depth`` output channels, the ``net`` settings and :meth:`build_head`."""
        net = self.settings.net
        return VRNNet(
            out_channels=self.grid.depth,
            in_channels=self.input_channels,
            features=net.features,
            stacks=net.stacks,
            hourglass_depth=net.hourglass_depth,
            head=self.build_head,
        )

    def build_head(self, features: int, out_channels: int) -> nn.Module:
        """The head, ``(B, features, h, w) -> (B, out_channels, h, w)``: the paper's 1x1 convolution. A variant
        with another head overrides this (docs/variants.md)."""
        return ConvHead(features, out_channels)


@dataclass
class NoAlignmentSettings(VolumeSettings):
    """The no-alignment ablation: the target is the frontal (fixed-orientation) volume."""

    target_frame: Literal["aligned", "frontal"] = "frontal"


@register("vrn_no_alignment")
class VRNNoAlignment(VRN):
    """VRN trained on frontal volumes (the paper's Section 5 ablation); scored against the ground truth
    frontalised with its pose (:func:`lightning_vrn.metrics.nme.scoring_vertices`). Needs dataset files
    made with ``--frontal``."""

    Settings = NoAlignmentSettings
