"""Image -> occupancy volume models: the grid targets, per-voxel BCE, voxel IoU and soft-volume prediction.

A volume variant is a small subclass of :class:`VolumeRegressionModule` that overrides the hooks
:meth:`~VolumeRegressionModule.build_network`, :meth:`~VolumeRegressionModule.network_inputs`,
and, when it predicts more than the volume, :meth:`~VolumeRegressionModule.forward` and
:meth:`~VolumeRegressionModule.losses` (passing ``upsample_volume`` on, for ``model.fused_loss``).

Batch contract (from the DataModule): ``"image"`` float32 ``(B, 3, H, W)`` in [0, 1],
``"volume"`` float32 ``(B, D, H, W)`` in {0, 1} (in the model's :attr:`target_frame`),
``"landmarks_2d"`` ``(B, 68, 2)``, ``"landmarks_3d"`` ``(B, 68, 3)``, ``"pose"`` ``(B, 3)``,
optional ``"heatmaps"`` ``(B, 68, H, W)``, optional ``"vertices"`` ``(B, V, 3)``, ``"index"`` ``(B,)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lightning_vrn.metrics.iou import VoxelIoU
from lightning_vrn.models.base import ModelSettings, VRNModule
from lightning_vrn.nets.upsampled_bce import upsampled_bce_with_logits
from lightning_vrn.nets.vrn import upsample

LOW_RES_LOGITS = "low_res_volume_logits"
"""The outputs' key of the volume logits before the bilinear x4, ``(B, D, H/4, W/4)``
(:meth:`VolumeRegressionModule.forward` with ``upsample_volume=False``)."""


def occupancy(volume_logits: torch.Tensor) -> torch.Tensor:
    """Soft occupancy ``(B, D, H, W)`` float32 in [0, 1] from logits (of any float dtype): the one conversion
    that prediction and scoring use."""
    return torch.sigmoid(volume_logits.float())


def volume_output(logits: torch.Tensor, upsampled: bool = True) -> dict[str, torch.Tensor]:
    """``{"volume_logits": logits}``, or ``{LOW_RES_LOGITS: logits}`` for the logits before the bilinear x4."""
    return {"volume_logits" if upsampled else LOW_RES_LOGITS: logits}


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
    benchmarks/results_gpu.md): ``channels_last`` runs the network in NHWC memory layout (slower than
    NCHW with bf16 at batches 4-32 there, so off); ``compile`` runs it through ``torch.compile`` (the
    compiled network + loss ran faster at batch 32, but its first step compiles for minutes, which a
    long run pays once and a short trial should not, so off; experiments/configs/paper.yaml);
    ``fused_loss`` trains with :func:`~lightning_vrn.nets.upsampled_bce.upsampled_bce_with_logits`, the BCE of
    the upsampled logits computed from the logits before the bilinear x4 without the full-size logits
    (the same loss and gradient to float rounding; its memory and time on the CPU are in
    benchmarks/results_train_step.md, on a GPU not yet measured, so off; docs/configs.md). Validation, test
    and prediction still upsample.
    """

    net: NetSettings = field(default_factory=NetSettings)
    target_frame: Literal["aligned", "frontal"] = "aligned"
    channels_last: bool = False
    compile: bool = False
    fused_loss: bool = False


class VolumeRegressionModule(VRNModule):
    """Image -> occupancy volume regression on the model's :class:`VoxelGrid`, trained with per-voxel BCE."""

    Settings = VolumeSettings
    #: Channels of :meth:`network_inputs` (RGB for VRN; VRN-Guided adds 68 heatmaps).
    input_channels: int = 3

    def __init__(self, grid, **settings):
        super().__init__(grid, **settings)
        self.net = self.build_network()
        if self.settings.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        # A compiled function, not a compiled submodule (which would enter the state dict twice):
        # checkpoints keep the plain keys whether or not the network is compiled.
        self._compiled_network = torch.compile(self.net.forward) if self.settings.compile else None
        self.train_iou, self.val_iou, self.test_iou = VoxelIoU(), VoxelIoU(), VoxelIoU()
        if self.settings.fused_loss:
            self.check_low_res_logits()

    @property
    def target_frame(self) -> str:
        """Frame of the predicted (and target) volume: ``aligned`` or ``frontal``."""
        return self.settings.target_frame

    # ----- hooks for variants -----

    def build_network(self) -> nn.Module:
        """The network, built from ``self.settings.net``, ``self.grid`` and :attr:`input_channels`."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_network()")

    def network_inputs(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The network's input ``(B, input_channels, H, W)``; VRN: the normalised image."""
        return self.normalised_image(batch)

    def forward(self, batch: Mapping[str, torch.Tensor], upsample_volume: bool = True) -> dict[str, torch.Tensor]:
        """``{"volume_logits": (B, D, H, W)}``; ``upsample_volume=False``: ``{LOW_RES_LOGITS: (B, D, H/4, W/4)}``
        instead (:data:`LOW_RES_LOGITS`); variants predicting more add keys."""
        self.check_batch(batch)
        return volume_output(self.run_network(self.network_inputs(batch), upsample_volume), upsample_volume)

    def run_network(self, inputs: torch.Tensor, upsample_volume: bool = True):
        """``self.net(inputs)``, in channels_last layout and through ``torch.compile`` when the settings ask;
        ``self.net(inputs, upsample_volume=False)`` for the volume logits before the bilinear x4."""
        if self.settings.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        network = self._compiled_network or self.net
        return network(inputs) if upsample_volume else network(inputs, upsample_volume=False)

    def stage_outputs(self, batch: Mapping[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        """``self(batch)``; in training with ``fused_loss``, the volume logits before the bilinear x4."""
        if stage == "train" and self.settings.fused_loss:
            return self(batch, upsample_volume=False)
        return self(batch)

    def losses(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named losses; ``"loss"`` is the total that is optimised. VRN: per-voxel BCE (mean over voxels), by the
        fused loss when the outputs hold the logits before the bilinear x4 (:data:`LOW_RES_LOGITS`)."""
        if LOW_RES_LOGITS in outputs:
            volume_bce = upsampled_bce_with_logits(outputs[LOW_RES_LOGITS], batch["volume"])
        else:
            volume_bce = F.binary_cross_entropy_with_logits(outputs["volume_logits"], batch["volume"])
        return {"loss": volume_bce, "volume_bce": volume_bce}

    # ----- volume machinery -----

    def update_metrics(self, stage: str, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> None:
        """Voxel IoU of the predicted occupancy, logged as ``{stage}/iou`` (an epoch value)."""
        iou = getattr(self, f"{stage}_iou")
        if LOW_RES_LOGITS in outputs:  # upsampled a sample at a time (the IoU is per sample): one sample's logits
            for logits, volume in zip(outputs[LOW_RES_LOGITS].detach(), batch["volume"]):
                iou.update(upsample(logits[None], volume.shape[-2:]), volume[None])
        else:
            iou.update(outputs["volume_logits"], batch["volume"])
        self.log(f"{stage}/iou", iou, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch["image"].shape[0])

    def check_low_res_logits(self) -> None:
        """Raise a clear ValueError when the model's forward or its network's cannot return the volume logits
        before the bilinear x4, which ``fused_loss`` trains on: both need an ``upsample_volume`` argument, as
        :class:`~lightning_vrn.nets.vrn.VRNNet` and :class:`~lightning_vrn.nets.vrn.MultitaskNet` have."""
        lacking = [name for name, function in ((f"{type(self).__name__}.forward", self.forward),
                                               (f"{type(self.net).__name__}.forward", self.net.forward))
                   if "upsample_volume" not in inspect.signature(function).parameters]
        if lacking:
            raise ValueError(f"model.fused_loss needs the volume logits before the upsampling, but "
                             f"{' and '.join(lacking)} take no upsample_volume argument: set model.fused_loss=false, "
                             f"or pass upsample_volume on as VolumeRegressionModule.forward does")

    def check_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Raise a clear ValueError when the batch's image or volume does not fit the model's grid."""
        self.check_image(batch)
        if "volume" in batch and tuple(batch["volume"].shape[1:]) != self.grid.shape:
            raise ValueError(
                f"batch volume shape {tuple(batch['volume'].shape)} does not match the model grid "
                f"{self.grid.describe()}: the dataset was generated for another grid; regenerate it for this grid "
                f"or train with the dataset's grid"
            )

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int = 0) -> torch.Tensor:
        """Soft occupancy ``(B, D, H, W)`` float32 in [0, 1], in :attr:`target_frame`."""
        return occupancy(self(batch)["volume_logits"])
