"""Networks: stacked-hourglass blocks and the VRN volume regressor."""

from lightning_vrn.nets.hourglass import Hourglass, HourglassStack, Residual, conv_bn_relu
from lightning_vrn.nets.vrn import ConvHead, HeadFactory, Stem, VRNNet, upsample

__all__ = ["ConvHead", "HeadFactory", "Hourglass", "HourglassStack", "Residual", "Stem", "VRNNet", "conv_bn_relu", "upsample"]
