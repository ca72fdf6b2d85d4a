"""Networks: stacked-hourglass blocks and the VRN volume regressor."""

from lightning_vrn.nets.hourglass import Hourglass, HourglassStack, Residual, conv_bn_relu
from lightning_vrn.nets.vrn import Stem, VolumeHead, VRNNet

__all__ = ["Hourglass", "HourglassStack", "Residual", "Stem", "VRNNet", "VolumeHead", "conv_bn_relu"]
