"""Weights & Biases media of the NME epochs: the cumulative error curve, reconstructions as point clouds, volume slices.

:class:`WandbMedia` follows an :class:`~lightning_vrn.callbacks.NMECallback`: on each validation or
test epoch that the NME scores, rank 0 keeps its first ``samples`` samples and, after the NME's
summary, logs into the trainer's :class:`~pytorch_lightning.loggers.WandbLogger`:

- ``{stage}/ced``: the NME cumulative error curve (fraction of the scored samples with NME <= x, as
  ``ced.png`` draws it), a W&B line plot of a table with columns ``nme`` and ``fraction``;
- ``{stage}/reconstructions``: one ``wandb.Object3D`` point cloud per sample, the predicted
  iso-surface's vertices in orange and the ground-truth mesh's in blue, in crop coordinates (x
  right, y down, z away from the camera, pixels; in the model's target frame);
- ``{stage}/volume_slices``: one ``wandb.Image`` per sample, the predicted soft volume (top row)
  above the target volume (bottom row): depth slices at 1/4, 1/2 and 3/4 of the depth, then the
  middle row (depth down, x across).

Without a WandbLogger the callback does nothing. ``wandb`` is imported only when something is
logged, so this module imports where it is not installed.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from lightning_vrn.callbacks import NMECallback, predicted_occupancy
from lightning_vrn.metrics.report import COLUMNS

MAX_POINTS = 20_000
"""Most points of each cloud (prediction, ground truth) in a logged reconstruction; evenly subsampled."""
PREDICTION_RGB = (240, 120, 30)
GROUND_TRUTH_RGB = (40, 110, 230)
SEPARATOR_RGB = (200, 40, 160)


def ced_points(table: Mapping[str, np.ndarray]) -> list[tuple[float, float]]:
    """The cumulative error curve of a per-sample table: ``(nme, fraction of the N scored samples with NME <= nme)``
    for each sample that did not fail, in increasing NME (failed samples are left out, as in ``ced.png``)."""
    nme = np.sort(np.asarray(table["nme"], dtype=np.float64)[~np.asarray(table["failed"], dtype=bool)])
    return [(float(value), (rank + 1) / len(nme)) for rank, value in enumerate(nme)]


def ced_plot(curves: Mapping[str, Mapping[str, np.ndarray]], title: str):
    """A W&B line plot of the cumulative error curves of ``curves`` (name -> per-sample table), one line each."""
    import wandb

    rows = [[name, nme, fraction] for name, table in curves.items() for nme, fraction in ced_points(table)]
    data = wandb.Table(columns=["method", "nme", "fraction"], data=rows)
    return wandb.plot.line(data, "nme", "fraction", stroke="method", title=title)


def per_sample_table(table: Mapping[str, np.ndarray]):
    """A per-sample NME table (:data:`~lightning_vrn.metrics.report.COLUMNS`) as a ``wandb.Table``; NaN -> None."""
    import wandb

    def plain(value):
        value = value.item()
        return None if isinstance(value, float) and math.isnan(value) else value

    rows = [[plain(table[column][row]) for column in COLUMNS] for row in range(len(table["index"]))]
    return wandb.Table(columns=list(COLUMNS), data=rows)


def point_cloud(prediction: np.ndarray, ground_truth: np.ndarray) -> np.ndarray:
    """``(N, 6)`` float32 ``x, y, z, r, g, b`` (colours 0-255): the ``(P, 3)`` predicted vertices in orange and the
    ``(G, 3)`` ground-truth vertices in blue, each evenly subsampled to at most :data:`MAX_POINTS`."""
    clouds = []
    for points, rgb in ((prediction, PREDICTION_RGB), (ground_truth, GROUND_TRUTH_RGB)):
        points = np.asarray(points, dtype=np.float32).reshape(-1, 3)
        points = points[::max(1, math.ceil(len(points) / MAX_POINTS))]
        clouds.append(np.hstack([points, np.broadcast_to(np.float32(rgb), points.shape)]))
    return np.concatenate(clouds)


def slice_panel(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``(2 * T + 2, 4 * W + 6, 3)`` uint8 picture of two ``(D, H, W)`` volumes in [0, 1], in grey: the prediction's
    depth slices at D/4, D/2, 3D/4 and its middle row ``[:, H // 2, :]`` (``(D, W)``), the target's below, in
    tiles of height ``T = max(D, H)`` separated by 2-pixel :data:`SEPARATOR_RGB` lines."""
    depth, height, width = prediction.shape
    tile = max(depth, height)
    panel = np.empty((2 * tile + 2, 4 * width + 6, 3), dtype=np.uint8)
    panel[:] = SEPARATOR_RGB
    for row, volume in enumerate((prediction, target)):
        slices = [volume[depth * k // 4] for k in (1, 2, 3)] + [volume[:, height // 2, :]]
        for column, picture in enumerate(slices):
            top, left = row * (tile + 2), column * (width + 2)
            panel[top:top + tile, left:left + width] = 0
            panel[top:top + len(picture), left:left + width] = np.round(255 * np.clip(picture, 0, 1))[..., None]
    return panel


class WandbMedia(pl.Callback):
    """Log the CED of each NME epoch and, for its first ``samples`` samples, reconstructions and volume slices to
    W&B (see the module's description). Put it after ``nme`` in the Trainer's callbacks: it follows the epochs
    ``nme`` scores and reads ``nme.tables`` after ``nme`` has filled them. ``samples`` = 0: the CED only."""

    def __init__(self, nme: NMECallback, samples: int = 4):
        if samples < 0:
            raise ValueError(f"samples must be >= 0 (0: the error curve only), got {samples}")
        self.nme, self.samples = nme, samples
        self.captured: list[dict[str, Any]] = []
        self._logger: WandbLogger | None = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._capture(pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, "test" if trainer.testing else "val")

    # the test epoch is followed the same way
    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end

    def _begin(self, trainer: pl.Trainer) -> None:
        """Follow this epoch on rank 0 when the NME scores it and a WandbLogger is there."""
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        self._logger = loggers[0] if loggers and self.nme.scoring and trainer.is_global_zero else None
        self.captured = []

    def _capture(self, pl_module: pl.LightningModule, outputs: Any, batch: Mapping[str, Any]) -> None:
        """Keep the iso-surface, the ground truth and the slices of the batch's samples up to ``samples``."""
        if self._logger is None or len(self.captured) >= self.samples:
            return
        from lightning_vrn.geometry.isosurface import volume_to_mesh
        from lightning_vrn.metrics.nme import scoring_vertices

        count = min(len(batch["index"]), self.samples - len(self.captured))
        volumes = predicted_occupancy(outputs, count).cpu().numpy()
        for k in range(count):
            predicted, _ = volume_to_mesh(volumes[k], pl_module.grid)
            truth = scoring_vertices(np.asarray(batch["vertices"][k].detach().cpu()), batch["pose"][k].detach().cpu()
                                     .numpy(), self.nme.frame)
            self.captured.append({
                "index": int(batch["index"][k]),
                "cloud": point_cloud(predicted, truth),
                "slices": slice_panel(volumes[k], batch["volume"][k].detach().float().cpu().numpy()),
            })

    def _log(self, trainer: pl.Trainer, stage: str) -> None:
        """The CED of the stage's NME table and the captured samples' media, at the trainer's global step."""
        if self._logger is None:
            return
        import wandb

        table = self.nme.tables[stage]
        nme = dict(zip(table["index"].tolist(), table["nme"].tolist()))
        media: dict[str, Any] = {f"{stage}/ced": ced_plot({stage: table}, f"{stage} NME cumulative error curve")}
        if self.captured:
            captions = [f"sample {s['index']}: NME {nme.get(s['index'], float('nan')):.4f}" for s in self.captured]
            media[f"{stage}/reconstructions"] = [
                wandb.Object3D(s["cloud"], caption=f"{c} (orange: prediction, blue: ground truth)")
                for s, c in zip(self.captured, captions)]
            media[f"{stage}/volume_slices"] = [
                wandb.Image(s["slices"], caption=f"{c} (top: prediction, bottom: target; depth 1/4, 1/2, 3/4, "
                                                 f"middle row)") for s, c in zip(self.captured, captions)]
        self._logger.log_metrics(media, step=trainer.global_step)
        self._logger, self.captured = None, []
