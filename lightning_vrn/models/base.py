"""What every model of the suite shares: settings, registry, image normalisation, optimiser and schedule,
logging, checkpoint record.

A model is a :class:`VRNModule` subclass registered once with :func:`register`; its settings are a
dataclass (:attr:`VRNModule.Settings`, the one source of their defaults) that a config's ``model``
section is checked against. Subclasses implement :meth:`~VRNModule.forward` (a batch -> a dict of
named outputs) and :meth:`~VRNModule.losses` (named losses, ``"loss"`` the optimised total), and
may update stage metrics in :meth:`~VRNModule.update_metrics`. :mod:`lightning_vrn.models.volume`
adds the volume-specific part (grid targets, BCE, voxel IoU, soft-volume prediction).

Every checkpoint is enough to rebuild and score its model alone: its hyper-parameters (the grid and
the resolved settings) rebuild it (:func:`lightning_vrn.models.load_model`), and its record under
``"lightning_vrn"`` (:meth:`VRNModule.record`) names the variant and repeats what scoring needs (grid,
target frame, heatmap sigma) so that tools can read them without building the model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional

import pytorch_lightning as pl
import torch

from lightning_vrn import __version__
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.settings import parse_settings, settings_dict

# Normalisation of [0, 1] RGB images (ImageNet statistics), applied inside the module.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

MODELS: dict[str, type["VRNModule"]] = {}
"""Registered models by name (what a config's ``model.name`` and a checkpoint's variant hold)."""


def register(name: str):
    """Class decorator: register a :class:`VRNModule` subclass under ``name`` (its ``variant``)."""

    def add(cls: type[VRNModule]) -> type[VRNModule]:
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered by {MODELS[name].__qualname__}")
        cls.variant = name
        MODELS[name] = cls
        return cls

    return add


@dataclass
class OptimSettings:
    """RMSprop (the paper's optimiser) with one learning-rate drop: ``lr`` for epochs ``< drop_epoch``, then ``lr_after``.

    ``foreach``: update all parameters with one multi-tensor kernel per operation (None: PyTorch's
    default, which is foreach on CUDA; a per-parameter loop was slower on an H100, measured in
    benchmarks/results_gpu.md). PyTorch 2.11 has no fused RMSprop.
    """

    lr: float = 1e-4
    lr_after: float = 1e-5
    drop_epoch: int = 40
    alpha: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.0
    weight_decay: float = 0.0
    foreach: Optional[bool] = None

    def __post_init__(self):
        if self.lr <= 0 or self.lr_after <= 0:
            raise ValueError(f"optim lr and lr_after must be positive, got lr={self.lr}, lr_after={self.lr_after}")


@dataclass
class ModelSettings:
    """Settings every model has; a variant's dataclass extends it. ``name``: the variant's registered name
    (empty: the class's own, :attr:`VRNModule.variant`)."""

    name: str = ""
    optim: OptimSettings = field(default_factory=OptimSettings)


class VRNModule(pl.LightningModule):
    """Base LightningModule: ``grid`` (a :class:`VoxelGrid` or its ``to_dict()``) and the settings, as an instance
    of :attr:`Settings` (``settings=``, what a loaded config holds) or as keywords.

    ``VRN(grid=..., net={...}, optim={...})``: the keywords are the fields of :attr:`Settings`
    (nested ones as dicts); unknown keys and wrong types are errors naming the key.
    """

    Settings: ClassVar[type] = ModelSettings
    #: Registry name, set by :func:`register`; recorded in every checkpoint.
    variant: ClassVar[str] = ""
    #: Frame of the predicted volume: "aligned" (with the image) or "frontal"; None for no volume.
    target_frame: str | None = None

    def __init__(self, grid: Mapping[str, Any] | VoxelGrid, settings: ModelSettings | None = None, **values: Any):
        super().__init__()
        grid_dict = grid.to_dict() if isinstance(grid, VoxelGrid) else dict(grid)
        self.grid = VoxelGrid.from_dict(grid_dict)
        if settings is not None and (values or type(settings) is not self.Settings):
            raise TypeError(f"{type(self).__name__} takes settings= (a {self.Settings.__name__}) or keywords, "
                            f"not {type(settings).__name__} with {sorted(values)}")
        where = f"{type(self).__name__} settings"
        self.settings = copy.deepcopy(settings) or parse_settings(self.Settings, values, prefix="model.", where=where)
        if self.settings.name not in ("", self.variant):
            raise ValueError(f"model.name {self.settings.name!r} in {where}: this model is {self.variant!r}")
        self.settings.name = self.variant
        # Checkpoints carry the complete, resolved settings (not just what the caller passed).
        self.save_hyperparameters({"grid": grid_dict, **settings_dict(self.settings)})
        self.register_buffer("image_mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    # ----- what a subclass implements -----

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(batch) -> dict of outputs")

    def losses(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named losses; ``"loss"`` is the total that is optimised."""
        raise NotImplementedError(f"{type(self).__name__} must implement losses(outputs, batch)")

    def update_metrics(self, stage: str, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> None:
        """Update and log the stage's metric objects (``train``, ``val``, ``test``); none by default."""

    def stage_outputs(self, batch: Mapping[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        """The outputs that ``stage``'s :meth:`losses` and :meth:`update_metrics` take: ``self(batch)`` unless a
        model computes its training loss from something cheaper (a volume model's ``fused_loss``)."""
        return self(batch)

    @property
    def heatmap_sigma(self) -> float | None:
        """Sigma (pixels of this crop) of the landmark maps the model consumes or predicts (settings with a
        ``sigma_px``: :class:`lightning_vrn.heatmaps.HeatmapSettings`); None for a model without maps."""
        sigma = getattr(self.settings, "sigma_px", None)
        return None if sigma is None else float(sigma)

    # ----- shared machinery -----

    def normalised_image(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``batch["image"]`` ``(B, 3, H, W)`` in [0, 1] -> mean/std-normalised ``(B, 3, H, W)``."""
        return (batch["image"] - self.image_mean) / self.image_std

    def check_image(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Raise a clear ValueError when ``batch["image"]`` is not ``(B, 3, H, W)`` of the model's grid."""
        image = batch["image"]
        if image.ndim != 4 or image.shape[1] != 3 or tuple(image.shape[-2:]) != (self.grid.height, self.grid.width):
            raise ValueError(
                f"batch image shape {tuple(image.shape)} does not match the model grid {self.grid.describe()}: "
                f"expected (B, 3, {self.grid.height}, {self.grid.width}); the dataset was generated for another grid"
            )

    def _shared_step(self, batch: Mapping[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        """Forward, losses and metrics of one batch; logs ``{stage}/{loss name}``.

        Training losses are logged per step (the learning curve), validation and test losses as
        epoch means synchronised across processes. Returns the loss under ``"loss"`` and, for
        validation and test, the detached outputs (callbacks such as the NME reuse them).
        """
        outputs = self.stage_outputs(batch, stage)
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
        self.update_metrics(stage, outputs, batch)
        if per_step:
            return {"loss": losses["loss"]}
        return {"loss": losses["loss"].detach(), **{key: value.detach() for key, value in outputs.items()}}

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "test")

    def record(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild and score this model on its own (plain types only)."""
        return {
            "variant": self.variant,
            "grid": self.grid.to_dict(),
            "target_frame": self.target_frame,
            "heatmap_sigma": self.heatmap_sigma,
            "lightning_vrn_version": __version__,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lightning_vrn"] = self.record()

    def configure_optimizers(self) -> dict[str, Any]:
        """RMSprop at ``lr``, dropped to ``lr_after`` at epoch ``drop_epoch`` (stepped once per epoch)."""
        optim = self.settings.optim
        optimizer = torch.optim.RMSprop(
            self.parameters(),
            lr=optim.lr,
            alpha=optim.alpha,
            eps=optim.eps,
            momentum=optim.momentum,
            weight_decay=optim.weight_decay,
            foreach=optim.foreach,
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[optim.drop_epoch], gamma=optim.lr_after / optim.lr
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
