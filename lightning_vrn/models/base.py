"""What every VRN variant shares: grid bookkeeping, loss, optimiser, logging and prediction.

A variant is a small subclass of :class:`VolumeRegressionModule` that overrides the hooks
:meth:`~VolumeRegressionModule.build_network`, :meth:`~VolumeRegressionModule.network_inputs`,
and, when it predicts more than the volume, :meth:`~VolumeRegressionModule.forward` and
:meth:`~VolumeRegressionModule.losses`.

Batch contract (from the DataModule): ``"image"`` float32 ``(B, 3, H, W)`` in [0, 1],
``"volume"`` float32 ``(B, D, H, W)`` in {0, 1}, ``"landmarks_2d"`` ``(B, 68, 2)``,
``"landmarks_3d"`` ``(B, 68, 3)``, ``"pose"`` ``(B, 3)``, optional ``"heatmaps"`` ``(B, 68, H, W)``,
optional ``"vertices"`` ``(B, V, 3)``, ``"index"`` ``(B,)``.
"""

from __future__ import annotations

from typing import Any, Mapping

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from lightning_vrn.geometry.grid import VoxelGrid

# Normalisation of [0, 1] RGB images (ImageNet statistics), applied inside the module.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def _resolve(values: Mapping[str, Any] | None, defaults: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``defaults`` updated with ``values``; a key absent from ``defaults`` is a KeyError naming ``what``."""
    values = dict(values or {})
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise KeyError(f"unknown {what} keys {unknown}; valid keys: {sorted(defaults)}")
    return {**defaults, **values}


class VoxelIoU(Metric):
    """Mean over samples of the voxel IoU of the predicted occupancy (logit > 0) against a binary target.

    Sum states reduce correctly across DDP processes. A sample whose prediction and target are
    both empty counts as IoU 1.
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("iou_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("samples", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """``logits`` and ``target`` ``(B, ...)``; a voxel is predicted occupied where its logit is > 0
        (probability > 0.5) and is occupied in the target where the target is > 0.5.
        """
        predicted = (logits.detach() > 0).flatten(1).float()
        occupied = (target > 0.5).flatten(1).float()
        intersection = (predicted * occupied).sum(dim=1)
        union = predicted.sum(dim=1) + occupied.sum(dim=1) - intersection
        iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
        self.iou_sum += iou.sum()
        self.samples += iou.numel()

    def compute(self) -> torch.Tensor:
        """Mean IoU over all samples seen since the last reset."""
        return self.iou_sum / self.samples.clamp(min=1)


class VolumeRegressionModule(pl.LightningModule):
    """Image -> occupancy volume regression on a :class:`VoxelGrid`, trained with per-voxel BCE.

    ``grid``: the grid as ``VoxelGrid.to_dict()`` (or a VoxelGrid); saved in every checkpoint.
    ``net``: network settings, keys of :attr:`NET_DEFAULTS` (``features``, ``stacks``, ``hourglass_depth``).
    ``optim``: RMSprop settings, keys of :attr:`OPTIM_DEFAULTS`; the learning rate is ``lr`` for
    epochs ``< drop_epoch`` and ``lr_after`` from then on.
    """

    NET_DEFAULTS: dict[str, Any] = {"features": 256, "stacks": 2, "hourglass_depth": 4}
    OPTIM_DEFAULTS: dict[str, Any] = {
        "lr": 1e-4,
        "lr_after": 1e-5,
        "drop_epoch": 40,
        "alpha": 0.99,
        "eps": 1e-8,
        "momentum": 0.0,
        "weight_decay": 0.0,
    }
    #: Channels of :meth:`network_inputs` (RGB for VRN; VRN-Guided adds 68 heatmaps).
    input_channels: int = 3
    #: Registry name (``lightning_vrn.models.MODELS``), recorded in every checkpoint as ``"variant"``.
    variant: str = ""

    def __init__(
        self,
        grid: Mapping[str, Any] | VoxelGrid,
        net: Mapping[str, Any] | None = None,
        optim: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        grid_dict = grid.to_dict() if isinstance(grid, VoxelGrid) else dict(grid)
        self.grid = VoxelGrid.from_dict(grid_dict)
        net_config = _resolve(net, self.NET_DEFAULTS, "net")
        optim_config = _resolve(optim, self.OPTIM_DEFAULTS, "optim")
        if optim_config["lr"] <= 0 or optim_config["lr_after"] <= 0:
            raise ValueError(f"optim lr and lr_after must be positive, got {optim_config}")
        # Checkpoints carry the complete, resolved settings (not just what the caller passed).
        self.hparams.update(grid=grid_dict, net=net_config, optim=optim_config)

        self.register_buffer("image_mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)
        self.net = self.build_network()
        self.train_iou, self.val_iou, self.test_iou = VoxelIoU(), VoxelIoU(), VoxelIoU()

    # ----- hooks for variants -----

    def build_network(self) -> nn.Module:
        """The network, built from ``self.hparams.net``, ``self.grid`` and :attr:`input_channels`."""
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
        return {"volume_logits": self.net(self.network_inputs(batch))}

    def losses(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named losses; ``"loss"`` is the total that is optimised. VRN: per-voxel BCE (mean over voxels)."""
        volume_bce = F.binary_cross_entropy_with_logits(outputs["volume_logits"], batch["volume"])
        return {"loss": volume_bce, "volume_bce": volume_bce}

    # ----- shared machinery -----

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

    def _shared_step(self, batch: Mapping[str, torch.Tensor], stage: str) -> torch.Tensor:
        """Loss of one batch; logs ``{stage}/{loss name}`` and ``{stage}/iou``.

        Training losses are logged per step (the learning curve), validation and test losses as
        epoch means synchronised across processes; the IoU is always an epoch value.
        """
        outputs = self(batch)
        losses = self.losses(outputs, batch)
        batch_size = batch["image"].shape[0]
        per_step = stage == "train"
        for name, value in losses.items():
            self.log(
                f"{stage}/{name}",
                value,
                on_step=per_step,
                on_epoch=not per_step,
                prog_bar=name == "loss",
                sync_dist=not per_step,
                batch_size=batch_size,
            )
        iou = getattr(self, f"{stage}_iou")
        iou.update(outputs["volume_logits"], batch["volume"])
        self.log(f"{stage}/iou", iou, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch_size)
        return losses["loss"]

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int = 0) -> torch.Tensor:
        """Soft occupancy ``(B, D, H, W)`` float in [0, 1] (sigmoid of the logits)."""
        return torch.sigmoid(self(batch)["volume_logits"]).float()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["variant"] = self.variant

    def configure_optimizers(self) -> dict[str, Any]:
        """RMSprop at ``lr``, dropped to ``lr_after`` at epoch ``drop_epoch`` (stepped once per epoch)."""
        optim = self.hparams.optim
        optimizer = torch.optim.RMSprop(
            self.parameters(),
            lr=optim["lr"],
            alpha=optim["alpha"],
            eps=optim["eps"],
            momentum=optim["momentum"],
            weight_decay=optim["weight_decay"],
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[optim["drop_epoch"]], gamma=optim["lr_after"] / optim["lr"]
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
