"""LightningDataModule over the train/val/test dataset files (batch contract: :mod:`datamodules.dataset`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from datamodules.augment import AugmentSettings
from datamodules.dataset import EpochShuffleSampler, FaceVolumeDataset, collate_samples, decode_batch, finish_batch
from lightning_vrn.dataset_file import open_dataset
from lightning_vrn.geometry.grid import PAPER_GRID, VoxelGrid

# Lightning warns that a plain DataLoader cannot resume mid-epoch; this one's sampler does (train_dataloader).
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


@dataclass
class DataSettings:
    """A config's ``data`` section: the split files, batching and augmentation (what the model needs
    from the data, the target frame and heatmap sigma, comes from the model's settings).

    ``dir``: folder of ``train.h5``, ``val.h5``, ``test.h5``; ``train`` / ``val`` / ``test``: each
    split's file (null: ``{dir}/{split}.h5``, resolved when used, so a saved config follows a new
    ``data.dir``; ``none``: no such split, e.g. ``data.val=none`` trains without validation).
    ``batch_size`` is global (divided by the number of processes).
    """

    dir: str = "data/synthetic-192"
    train: Optional[str] = None
    val: Optional[str] = None
    test: Optional[str] = None
    batch_size: int = 4
    num_workers: int = 4
    pin_memory: bool = True
    persistent_workers: bool = True
    augment: AugmentSettings = field(default_factory=AugmentSettings)

    def __post_init__(self):
        if self.batch_size <= 0 or self.num_workers < 0:
            raise ValueError(f"data.batch_size ({self.batch_size}) must be positive and data.num_workers "
                             f"({self.num_workers}) >= 0")


def split_path(data: DataSettings | Mapping[str, Any], split: str) -> str | None:
    """The file of ``split`` in a config's ``data`` section (its settings, or the mapping a saved ``config.yaml``
    holds): ``{dir}/{split}.h5`` when null, None when ``none``."""
    value, folder = (data[split], data["dir"]) if isinstance(data, Mapping) else (getattr(data, split), data.dir)
    if value is None:
        return f"{folder}/{split}.h5"
    return None if str(value).strip().lower() in ("", "none") else str(value)


_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


def as_grid(grid: VoxelGrid | Mapping[str, Any] | str) -> VoxelGrid:
    """A :class:`VoxelGrid` from itself, its ``to_dict()`` form or ``"D,H,W"``."""
    if isinstance(grid, VoxelGrid):
        return grid
    if isinstance(grid, str):
        return VoxelGrid.parse(grid)
    return VoxelGrid.from_dict(dict(grid))


class FaceVolumeDataModule(pl.LightningDataModule):
    """Train/val/test dataset files -> batches, augmented in training (the authors' augmentation: docs/paper.md).

    ``batch_size`` is GLOBAL: each of the trainer's ``world_size`` processes loads
    ``batch_size // world_size``. ``grid``: the grid every file must have. ``augment``: a dict of
    :class:`AugmentSettings` fields (training only; ``on_device: true`` unpacks and augments on the
    accelerator in :meth:`on_after_batch_transfer`, which also unpacks val/test batches there).
    ``heatmap_sigma``: add landmark heatmaps (pixels; None: none), made on the device like the
    float32 volume (workers hand over uint8 volumes). ``target_volume``: ``aligned``
    or ``frontal`` (no-alignment ablation). ``eval_vertices``: add ground-truth vertices to
    val/test batches (for NME). ``val_path`` is optional for fitting (no validation without it).
    ``grid_source`` names where ``grid`` came from, for the error when a file has another grid.
    """

    def __init__(self, train_path: str | Path | None = None, val_path: str | Path | None = None,
                 test_path: str | Path | None = None, grid: VoxelGrid | Mapping[str, Any] | str = PAPER_GRID,
                 batch_size: int = DataSettings.batch_size, num_workers: int = DataSettings.num_workers,
                 augment: AugmentSettings | Mapping[str, Any] | None = None, heatmap_sigma: float | None = None,
                 target_volume: str = "aligned", seed: int = 0, pin_memory: bool = DataSettings.pin_memory,
                 persistent_workers: bool = DataSettings.persistent_workers, eval_vertices: bool = True,
                 grid_source: str = "the config"):
        super().__init__()
        self.save_hyperparameters()
        self.grid = as_grid(grid)
        self.augment = AugmentSettings.from_any(augment)
        self.hparams["grid"] = self.grid.to_dict()
        self.hparams["augment"] = self.augment.to_dict()
        for split in ("train", "val", "test"):  # plain strings: checkpoints load with PyTorch's safe loader
            if isinstance(self.hparams[f"{split}_path"], Path):
                self.hparams[f"{split}_path"] = str(self.hparams[f"{split}_path"])
        if batch_size <= 0 or num_workers < 0:
            raise ValueError(f"batch_size ({batch_size}) must be positive and num_workers ({num_workers}) >= 0")
        self.batch_size_per_device = batch_size
        self.datasets: dict[str, FaceVolumeDataset] = {}

    @classmethod
    def for_model(cls, model: Any, data: DataSettings | None = None, seed: int = 0,
                  **options: Any) -> "FaceVolumeDataModule":
        """The DataModule of a config's ``data`` settings serving what ``model`` needs: its grid, its heatmap sigma
        (:attr:`~lightning_vrn.models.VRNModule.heatmap_sigma`), its target frame. ``options``: constructor
        arguments that replace the settings' (e.g. ``test_path=`` to score another file)."""
        data = data or DataSettings()
        arguments = dict(
            train_path=split_path(data, "train"), val_path=split_path(data, "val"), test_path=split_path(data, "test"),
            grid=model.grid.to_dict(), batch_size=data.batch_size, num_workers=data.num_workers,
            augment=data.augment.to_dict(),  # plain values: the hyper-parameters go into checkpoints
            heatmap_sigma=model.heatmap_sigma, target_volume=model.target_frame or "aligned", seed=seed,
            pin_memory=data.pin_memory, persistent_workers=data.persistent_workers)
        return cls(**{**arguments, **options})

    def _path(self, split: str) -> str | Path | None:
        return self.hparams[f"{split}_path"]

    def setup(self, stage: str | None = None) -> None:
        """Split the global batch over the processes and open (validate) the files ``stage`` needs."""
        self.check_files(stage, self.trainer.world_size if self.trainer is not None else 1)

    def check_files(self, stage: str | None = "fit", world_size: int = 1) -> None:
        """Open and validate the files of ``stage`` for ``world_size`` processes, with errors that name the fix.

        Refuses a global batch that does not divide by the processes and a training split smaller
        than one batch per process (it would train nothing).
        """
        batch_size = self.hparams.batch_size
        if batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} is not divisible by the world size {world_size} "
                             f"(devices x nodes); choose a batch_size that is a multiple of {world_size}")
        self.batch_size_per_device = batch_size // world_size
        for split in _STAGE_SPLITS[stage or "fit"]:
            if split in self.datasets or (split == "val" and stage in ("fit", None) and self._path("val") is None):
                continue
            if self._path(split) is None:
                raise ValueError(f"stage '{stage}' needs the {split} split but none is set; set data.{split} "
                                 f"(or data.dir) to a dataset file")
            self.datasets[split] = FaceVolumeDataset(
                self._path(split), grid=self.grid, augment=self.augment if split == "train" else None,
                seed=self.hparams.seed, heatmap_sigma=self.hparams.heatmap_sigma,
                target_volume=self.hparams.target_volume,
                load_vertices=split != "train" and self.hparams.eval_vertices, on_device=self.augment.on_device,
                finish=False, grid_source=self.hparams.grid_source)
        for split in ("val", "test"):
            if split in self.datasets and len(self.datasets[split]) == 0:
                raise ValueError(f"the {split} split {self.datasets[split].file.path} has no sample; regenerate it "
                                 f"or turn it off with data.{split}=none")
        train = self.datasets.get("train")
        if train is not None and len(train) // world_size < self.batch_size_per_device:
            raise ValueError(
                f"the training split {train.file.path} has {len(train)} samples, fewer than one batch of "
                f"{self.batch_size_per_device} per process ({world_size} process(es), global batch_size "
                f"{batch_size}): training would take no step. Use a smaller data.batch_size or more data")

    def topology(self, split: str = "test") -> dict[str, np.ndarray]:
        """Shared mesh topology of ``split``'s file: ``triangles`` (T, 3), ``face_region`` (F,),
        ``landmark_vertices`` (68,), int64. Each split may come from another mesh (e.g. a real test set).
        A file with per-sample topology (scans) has none: all three are None, and every vertex of a
        sample's own mesh is a face-region vertex."""
        if split in self.datasets:
            file = self.datasets[split].file
        elif self._path(split) is not None:
            file = open_dataset(self._path(split), self.grid, self.hparams.grid_source)
        else:
            raise ValueError(f"{split}_path is not set: set data.{split} to a dataset file to read its topology")
        return {"triangles": file.triangles, "face_region": file.face_region,
                "landmark_vertices": file.landmark_vertices}

    def _dataset(self, split: str) -> FaceVolumeDataset:
        if split not in self.datasets:
            raise RuntimeError(f"the {split} split is not set up: call setup() with a stage that uses it first")
        return self.datasets[split]

    def _loader(self, split: str, sampler=None) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(self._dataset(split), batch_size=self.batch_size_per_device, sampler=sampler,
                          num_workers=workers, drop_last=split == "train", collate_fn=collate_samples,
                          pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
                          persistent_workers=self.hparams.persistent_workers and workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Seeded shuffle, this process's share under DDP; each index carries the epoch for the augmentation
        seeds (Lightning sets it). Resumed from a checkpoint saved mid-epoch, the epoch goes on with the
        samples its completed steps had not reached, as if never interrupted."""
        trainer = self.trainer
        sampler = EpochShuffleSampler(len(self._dataset("train")), seed=self.hparams.seed,
                                      num_replicas=trainer.world_size if trainer else 1,
                                      rank=trainer.global_rank if trainer else 0)
        sampler.set_epoch(self._next_epoch())
        progress = trainer.fit_loop.epoch_loop.batch_progress if trainer else None  # restored from a checkpoint
        if progress is not None and not progress.is_last_batch:  # a checkpoint from the middle of an epoch
            sampler.resume_at(trainer.current_epoch, progress.current.processed * self.batch_size_per_device)
        return self._loader("train", sampler)

    def _next_epoch(self) -> int:
        """The epoch the Trainer's next training batch belongs to. DataLoader workers draw from the sampler
        when the loader's iterator is made, before Lightning sets the epoch, so it must be right here: after
        a checkpoint saved once an epoch's batches were all done (``is_last_batch``), whether or not the
        epoch was counted complete, the next is the number of epochs started; otherwise the current one."""
        trainer = self.trainer
        if trainer is None:
            return 0
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return trainer.fit_loop.epoch_progress.current.started
        return trainer.current_epoch

    def val_dataloader(self) -> DataLoader | list:
        """In order; an empty list (no validation) when no ``val_path`` is set."""
        return self._loader("val") if "val" in self.datasets or self._path("val") is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Finish batches on the device: unpack and augment (device path), float volume and heatmaps (both paths).

        The Trainer calls this; code that iterates the loaders itself must call it on each batch.
        """
        if isinstance(batch, Mapping) and "volume_packed" in batch:
            batch = decode_batch(batch, self.grid)
        if isinstance(batch, Mapping) and "volume" in batch:
            batch = finish_batch(batch, self.grid, self.hparams.heatmap_sigma)
        return batch
