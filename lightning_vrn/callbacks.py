"""Lightning callbacks: the paper's NME on validation (every few epochs, on a subset) and on test.

:class:`NMECallback` needs from the LightningModule ``grid`` (the :class:`VoxelGrid` of its volumes)
and ``predict_step(batch, batch_idx)`` returning the soft occupancy ``(B, D, H, W)`` in [0, 1]
(or a mapping with it under ``"volume"``); from the batch ``vertices`` (B, V, 3) ground-truth mesh
in crop pixels, ``landmarks_3d`` (B, 68, 3), ``pose`` (B, 3) radians and ``index`` (B,); and from
the DataModule's ``topology(split)["face_region"]``, the face-region vertex ids the NME is measured on.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn

from lightning_vrn.atomic import atomic_path
from lightning_vrn.landmarks import outer_interocular
from lightning_vrn.metrics.nme import ICP_DISTANCE_RATIO, NME

CSV_COLUMNS = ("index", "yaw_deg", "nme", "nme_aligned")


class NMECallback(pl.Callback):
    """Log ``val/nme``, ``val/nme_aligned``, ``val/nme_failed`` (and ``test/...``) and write per-sample CSVs.

    Validation: on epochs ``e`` with ``(e + 1) % every_n_epochs == 0`` that also run validation
    (with the Trainer's ``check_val_every_n_epoch`` > 1, make ``every_n_epochs`` a multiple of it;
    not during the sanity check; always under ``trainer.validate``), on the first ``max_val_samples`` validation samples
    (``None``: all; under DDP each process takes its share). Test: every sample. The metric states
    reduce across processes; rank 0 then writes ``val_epoch{e:04d}.csv`` / ``test.csv`` with columns
    ``index, yaw_deg, nme, nme_aligned`` into ``out_dir`` (default: the trainer's log directory).
    Predictions run under ``torch.no_grad`` in eval mode; the iso-surface and ICP run on the CPU
    (about 0.2 s per sample at the paper grid), only on these epochs, never in training steps.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        max_val_samples: int | None = 64,
        out_dir: str | os.PathLike | None = None,
        icp_distance_ratio: float = ICP_DISTANCE_RATIO,
    ):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs} (leave the callback out for no NME)")
        if max_val_samples is not None and max_val_samples < 1:
            raise ValueError(f"max_val_samples must be a positive number or None (all), got {max_val_samples}")
        self.every_n_epochs = every_n_epochs
        self.max_val_samples = max_val_samples
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.icp_distance_ratio = icp_distance_ratio
        self._metric: NME | None = None
        self._face_region: np.ndarray | None = None
        self._sample_limit: int | None = None
        self._samples_seen = 0

    # ----- validation -----

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = (trainer.current_epoch + 1) % self.every_n_epochs == 0 or trainer.state.fn == TrainerFn.VALIDATING
        if due and not trainer.sanity_checking:
            limit = None if self.max_val_samples is None else math.ceil(self.max_val_samples / trainer.world_size)
            self._start(trainer, pl_module, limit, "val")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._metric is not None:
            self._update(pl_module, batch, batch_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._metric is not None:
            self._finish(trainer, pl_module, "val", f"val_epoch{trainer.current_epoch:04d}.csv")

    # ----- test -----

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module, None, "test")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._metric is not None:
            self._update(pl_module, batch, batch_idx)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._metric is not None:
            self._finish(trainer, pl_module, "test", "test.csv")

    # ----- shared -----

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, limit: int | None, split: str) -> None:
        """A fresh metric on the module's device (NCCL gathers device tensors), ``split``'s face region, the limit."""
        grid = getattr(pl_module, "grid", None)
        if grid is None:
            raise AttributeError(f"NMECallback needs {type(pl_module).__name__}.grid, the VoxelGrid of its volumes")
        topology = getattr(trainer.datamodule, "topology", None)
        if not callable(topology):
            raise AttributeError(
                "NMECallback needs trainer.datamodule.topology(split)['face_region'] (face-region vertex ids of "
                "the ground-truth mesh); fit/validate/test with a datamodule that provides it"
            )
        topology = topology(split)
        face_region = np.asarray(topology["face_region"])
        self._face_region = np.flatnonzero(face_region) if face_region.dtype == bool else face_region.astype(np.int64)
        self._metric = NME(grid, icp_distance_ratio=self.icp_distance_ratio).to(pl_module.device)
        self._sample_limit = limit
        self._samples_seen = 0

    def _update(self, pl_module: pl.LightningModule, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Predict the batch (up to the sample limit) and add it to the metric."""
        missing = [key for key in ("vertices", "landmarks_3d", "pose", "index") if key not in batch]
        if missing:
            raise KeyError(
                f"NMECallback needs batch keys {missing}: load the ground-truth mesh vertices for validation "
                "and test (the DataModule's eval_vertices option)"
            )
        count = len(batch["index"])
        if self._sample_limit is not None:
            count = min(count, self._sample_limit - self._samples_seen)
        if count <= 0:
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            prediction = pl_module.predict_step(batch, batch_idx)
        pl_module.train(was_training)
        if isinstance(prediction, Mapping):
            prediction = prediction["volume"]

        vertices = batch["vertices"][:count].detach().cpu().numpy()
        landmarks = batch["landmarks_3d"][:count].detach().cpu().numpy()
        self._metric.update(
            prediction[:count].detach().float().cpu(),
            vertices[:, self._face_region],
            outer_interocular(landmarks),
            batch["pose"][:count, 1].detach().cpu(),
            batch["index"][:count].detach().cpu(),
        )
        self._samples_seen += count

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, csv_name: str) -> None:
        """Reduce across processes, log the means and write the per-sample CSV on rank 0."""
        metric, self._metric = self._metric, None
        values = metric.compute()  # collective under DDP: every process gets the global means
        table = metric.per_sample()  # collective too: every process must call it
        # The values are already global and equal on every process; sync_dist only averages equal numbers.
        for key, name in (("nme", "nme"), ("nme_aligned", "nme_aligned"), ("failed", "nme_failed")):
            pl_module.log(f"{stage}/{name}", values[key].to(torch.float32), sync_dist=True)
        if trainer.is_global_zero:
            out_dir = self.out_dir or Path(trainer.log_dir or trainer.default_root_dir)
            write_nme_csv(out_dir / csv_name, table)
        metric.reset()


def write_nme_csv(path: Path, table: Mapping[str, np.ndarray]) -> None:
    """Write a per-sample NME table (``index, yaw_deg, nme, nme_aligned`` columns) atomically."""
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for index, yaw_deg, nme, nme_aligned in zip(*(table[column] for column in CSV_COLUMNS)):
            writer.writerow([int(index), f"{yaw_deg:.3f}", f"{nme:.6g}", f"{nme_aligned:.6g}"])
