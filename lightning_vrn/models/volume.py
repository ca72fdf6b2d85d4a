"""Image -> occupancy volume models: the grid targets, per-voxel BCE, voxel IoU and soft-volume prediction.

A volume variant is a small subclass of :class:`VolumeRegressionModule` that overrides the hooks
:meth:`~VolumeRegressionModule.build_network`, :meth:`~VolumeRegressionModule.network_inputs`,
and, when it predicts more than the volume, :meth:`~VolumeRegressionModule.forward` and
:meth:`~VolumeRegressionModule.losses`.

Batch contract (from the DataModule): ``"image"`` float32 ``(B, 3, H, W)`` in [0, 1],
``"volume"`` float32 ``(B, D, H, W)`` in {0, 1} (in the model's :attr:`target_frame`),
``"landmarks_2d"`` ``(B, 68, 2)``, ``"landmarks_3d"`` ``(B, 68, 3)``, ``"pose"`` ``(B, 3)``,
optional ``"heatmaps"`` ``(B, 68, H, W)``, optional ``"vertices"`` ``(B, V, 3)``, ``"index"`` ``(B,)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lightning_vrn.metrics.iou import VoxelIoU
from lightning_vrn.models.base import ModelSettings, VRNModule

# Normalisation of [0, 1] RGB images (ImageNet statistics), applied inside the module.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def occupancy(volume_logits: torch.Tensor) -> torch.Tensor:
    """Soft occupancy ``(B, D, H, W)`` float32 in [0, 1] from logits (of any float dtype): the one conversion
    that prediction and scoring use."""
    return torch.sigmoid(volume_logits.float())


@dataclass
class NetSettings:
    """Stacked-hourglass network: ``features`` channels, ``stacks`` hourglasses of depth ``hourglass_depth``."""

    features: int = 256
    stacks: int = 2
    hourglass_depth: int = 4


@dataclass
class VolumeSettings(ModelSettings):
    """Settings of a volume model; ``target_frame``: ``aligned`` (VRN) or ``frontal`` (no-alignment ablation).

    Speed switches (they change no result beyond float rounding; measured on an H100 in
    benchmarks/results_gpu.md): ``channels_last`` runs the network in NHWC memory layout (0.81-0.87x as
    fast with bf16 at batch 4-32 there, so off); ``compile`` runs it through ``torch.compile`` (the
    first steps compile for tens of seconds; not measured on the whole network yet, so off).
    """

    net: NetSettings = field(default_factory=NetSettings)
    target_frame: Literal["aligned", "frontal"] = "aligned"
    channels_last: bool = False
    compile: bool = False


class VolumeRegressionModule(VRNModule):
    """Image -> occupancy volume regression on the model's :class:`VoxelGrid`, trained with per-voxel BCE."""

    Settings = VolumeSettings
    #: Channels of :meth:`network_inputs` (RGB for VRN; VRN-Guided adds 68 heatmaps).
    input_channels: int = 3

    def __init__(self, grid, **settings):
        super().__init__(grid, **settings)
        self.register_buffer("image_mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)
        self.net = self.build_network()
        if self.settings.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        # A function, not a submodule (which would enter the state dict twice): checkpoints keep the
        # plain keys whether or not the network is compiled.
        self._run_network = torch.compile(self.net.forward) if self.settings.compile else self.net.forward
        self.train_iou, self.val_iou, self.test_iou = VoxelIoU(), VoxelIoU(), VoxelIoU()

    @property
    def target_frame(self) -> str:
        """Frame of the predicted (and target) volume: ``aligned`` or ``frontal``."""
        return self.settings.target_frame

    # ----- hooks for variants -----

    def build_network(self) -> nn.Module:
        """The network, built from ``self.settings.net``, ``self.grid`` and :attr:`input_channels`."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_network()")

    def normalised_image(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``batch["image"]`` ``(B, 3, H, W)`` in [0, 1] -> mean/std-normalised ``(B, 3, H, W)``."""
        return (batch["image"] - self.image_mean) / self.image_std

    def network_inputs(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The network's input ``(B, input_channels, H, W)``; VRN: the normalised image."""
        return self.normalised_image(batch)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"volume_logits": (B, D, H, W)}``; variants predicting more add keys."""
        self.check_batch(batch)
        inputs = self.network_inputs(batch)
        if self.settings.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return {"volume_logits": self._run_network(inputs)}

    def losses(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named losses; ``"loss"`` is the total that is optimised. VRN: per-voxel BCE (mean over voxels)."""
        volume_bce = F.binary_cross_entropy_with_logits(outputs["volume_logits"], batch["volume"])
        return {"loss": volume_bce, "volume_bce": volume_bce}

    # ----- volume machinery -----

    def update_metrics(self, stage: str, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> None:
        """Voxel IoU of the predicted occupancy, logged as ``{stage}/iou`` (an epoch value)."""
        iou = getattr(self, f"{stage}_iou")
        iou.update(outputs["volume_logits"], batch["volume"])
        self.log(f"{stage}/iou", iou, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch["image"].shape[0])

    def check_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Raise a clear ValueError when the batch's image or volume does not fit the model's grid."""
        grid_text = self.grid.describe()
        image = batch["image"]
        if image.ndim != 4 or image.shape[1] != 3 or tuple(image.shape[-2:]) != (self.grid.height, self.grid.width):
            raise ValueError(
                f"batch image shape {tuple(image.shape)} does not match the model grid {grid_text}: expected "
                f"(B, 3, {self.grid.height}, {self.grid.width}); the dataset was generated for another grid"
            )
        if "volume" in batch and tuple(batch["volume"].shape[1:]) != self.grid.shape:
            raise ValueError(
                f"batch volume shape {tuple(batch['volume'].shape)} does not match the model grid {grid_text}: "
                f"the dataset was generated for another grid; regenerate it for this grid or train with "
                f"the dataset's grid"
            )

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int = 0) -> torch.Tensor:
        """Soft occupancy ``(B, D, H, W)`` float32 in [0, 1], in :attr:`target_frame`."""
        return occupancy(self(batch)["volume_logits"])
