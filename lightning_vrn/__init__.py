"""lightning-vrn: VRN (Jackson et al., ICCV 2017) volumetric face reconstruction in PyTorch Lightning."""

__version__ = "0.1.0"
