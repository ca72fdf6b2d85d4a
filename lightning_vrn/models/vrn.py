"""VRN: RGB image -> occupancy volume with two stacked hourglasses (no intermediate supervision)."""

from __future__ import annotations

from torch import nn

from lightning_vrn.models.base import register
from lightning_vrn.models.volume import VolumeRegressionModule
from lightning_vrn.nets.vrn import VRNNet


@register("vrn")
class VRN(VolumeRegressionModule):
    """The plain VRN of Jackson et al. (2017): the normalised RGB crop in, D depth-slice logits out."""

    def build_network(self) -> nn.Module:
        """:class:`VRNNet` with ``self.grid.depth`` output channels and the ``net`` settings."""
        net = self.settings.net
        return VRNNet(
            out_channels=self.grid.depth,
            in_channels=self.input_channels,
            features=net.features,
            stacks=net.stacks,
            hourglass_depth=net.hourglass_depth,
        )
