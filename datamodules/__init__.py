"""HDF5 dataset files -> batches: Dataset, DataModule, joint image/volume augmentation (landmark heatmaps:
:mod:`lightning_vrn.heatmaps`)."""

from datamodules.augment import (
    AugmentSettings,
    augment_batch,
    augment_landmarks,
    augment_mesh,
    augment_rotation,
    identity_params,
    sample_params,
)
from datamodules.datamodule import FaceVolumeDataModule
from datamodules.dataset import EpochShuffleSampler, FaceVolumeDataset, decode_batch, finish_batch, unpack_bits

__all__ = [
    "AugmentSettings",
    "EpochShuffleSampler",
    "FaceVolumeDataModule",
    "FaceVolumeDataset",
    "augment_batch",
    "augment_landmarks",
    "augment_mesh",
    "augment_rotation",
    "decode_batch",
    "finish_batch",
    "identity_params",
    "sample_params",
    "unpack_bits",
]
