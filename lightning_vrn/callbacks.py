"""Lightning callbacks: the paper's NME on validation and test, run checkpoints with a best-so-far score, the
SLURM requeue, and the distributed process group's end at exit.

:class:`NMECallback` scores the predictions that the validation and test steps already made (no
second forward pass). It needs from the LightningModule ``grid`` (the :class:`VoxelGrid` of its
volumes) and ``target_frame`` (``aligned`` or ``frontal``); from each step's outputs
``"volume"`` (soft occupancy in [0, 1]) or ``"volume_logits"``, ``(B, D, H, W)``; from the batch
``vertices`` (B, V, 3) ground-truth mesh in crop pixels, ``landmarks_3d`` (B, 68, 3), ``pose``
(B, 3) radians, ``index`` (B,) and optionally ``expression`` (B,) label ids; and from the
DataModule's ``topology(split)["face_region"]``, the face-region vertex ids the NME is measured on
(None for a file with per-sample topology, scans: ``vertices`` is then a list of each sample's own
face-region mesh, every vertex scored).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lightning_vrn.distributed import destroy_process_group_at_exit
from lightning_vrn.landmark_scheme import outer_interocular
from lightning_vrn.metrics.pool import NMEPool, default_workers
from lightning_vrn.metrics.report import write_report
from lightning_vrn.models.volume import occupancy


@dataclass
class NMESettings:
    """When the NME runs: validation every ``every_n_epochs`` epochs (0: never) on the first
    ``max_val_samples`` samples (None: all), and always on test; ``icp_distance_ratio``: the ICP
    cut-off as a fraction of the interocular distance (None: the metric's default, 0.1);
    ``icp_subsample``: ICP fits every k-th ground-truth vertex (1: all, the metric as published here;
    50 is faster but moves per-sample NMEs: docs/evaluation.md, "Speed"); ``workers``: processes that
    score the samples (None or 0: the cores this process may use, see
    :func:`lightning_vrn.metrics.pool.default_workers`; 1: in the training process), the same numbers
    with any number."""

    every_n_epochs: int = 5
    max_val_samples: Optional[int] = 64
    icp_distance_ratio: Optional[float] = None
    icp_subsample: int = 1
    workers: Optional[int] = None

    def __post_init__(self):
        if self.every_n_epochs < 0:
            raise ValueError(f"nme.every_n_epochs must be >= 0 (0: no validation NME), got {self.every_n_epochs}")
        if self.max_val_samples is not None and self.max_val_samples < 1:
            raise ValueError(f"nme.max_val_samples must be a positive number or null (all), got {self.max_val_samples}")
        if self.icp_subsample < 1:
            raise ValueError(f"nme.icp_subsample must be >= 1 (1: every ground-truth vertex), got {self.icp_subsample}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"nme.workers must be >= 0 or null (0, null: one per core this process may use), "
                             f"got {self.workers}")


@dataclass
class CheckpointSettings:
    """``best.ckpt`` is the checkpoint with the best ``monitor`` value (``mode`` min or max); its best-so-far
    value is logged as ``{monitor}_best``. Monitor ``val/nme`` to select by the validation NME.
    ``last.ckpt`` is written at every epoch end and, with ``every_n_train_steps`` > 0, every that many
    optimiser steps (a paper-config epoch on 300W-LP is about 15,000 steps: a kill then loses minutes)."""

    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    every_n_train_steps: int = 1000

    def __post_init__(self):
        if self.every_n_train_steps < 0:
            raise ValueError(f"checkpoint.every_n_train_steps must be >= 0 (0: epoch ends only), "
                             f"got {self.every_n_train_steps}")


def predicted_occupancy(outputs: Mapping[str, torch.Tensor], count: int) -> torch.Tensor:
    """``(count, D, H, W)`` soft occupancy of a step's first ``count`` predictions, from its ``"volume"``
    or its ``"volume_logits"``, detached."""
    if "volume" in outputs:
        return outputs["volume"][:count].detach().float()
    return occupancy(outputs["volume_logits"][:count].detach())


class NMECallback(pl.Callback):
    """Log ``{stage}/nme``, ``/nme_median``, ``/nme_aligned``, ``/nme_failed``, ``/nme_yaw_{lo}_{hi}``; write reports.

    ``settings``: :class:`NMESettings` (``every_n_epochs`` must be >= 1 here: leave the callback out
    for no validation NME). Validation: on epochs ``e`` with ``(e + 1) % every_n_epochs == 0`` that also run validation
    (with the Trainer's ``check_val_every_n_epoch`` > 1, make ``every_n_epochs`` a multiple of it;
    not during the sanity check; always under ``trainer.validate``), on the first ``max_val_samples``
    validation samples (``None``: all; under DDP each process takes its share). Test: every sample,
    or the first ``max_test_samples``. The per-sample states gather across processes; each dataset
    index counts once (a distributed sampler's padding repeats are dropped), so the values equal a
    single process's. Rank 0 writes the report (:func:`lightning_vrn.metrics.report.write_report`):
    ``val_epoch{e:04d}.csv`` / ``test.csv`` and their ``_summary.json`` into ``out_dir`` (default:
    the trainer's log directory). :attr:`summaries` and :attr:`tables` keep each stage's last summary and table. The
    iso-surface and ICP run on the CPU (their cost per sample: benchmarks/results_evaluation.md), only
    on these epochs, never in training steps, in a pool of ``settings.workers`` processes
    (:class:`~lightning_vrn.metrics.pool.NMEPool`; by default each DDP rank's share of the node's cores) made
    when the Trainer's run starts and closed when it ends or fails; or in ``pool``, which the caller owns
    (``experiments.evaluate`` shares one among its methods).
    """

    def __init__(self, settings: NMESettings | None = None, out_dir: str | os.PathLike | None = None,
                 max_test_samples: int | None = None, pool: NMEPool | None = None):
        settings = settings or NMESettings()
        if settings.every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {settings.every_n_epochs} (leave the callback out "
                             f"for no NME)")
        if max_test_samples is not None and max_test_samples < 1:
            raise ValueError(f"max_test_samples must be a positive number or None (all), got {max_test_samples}")
        self.every_n_epochs = settings.every_n_epochs
        self.max_val_samples = settings.max_val_samples
        self.icp_distance_ratio = settings.icp_distance_ratio
        self.icp_subsample = settings.icp_subsample
        self.workers = settings.workers
        self.max_test_samples = max_test_samples
        self._pool, self._own_pool = pool, pool is None
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.summaries: dict[str, dict] = {}
        self.tables: dict[str, dict] = {}
        self._metric = None
        self._face_region: np.ndarray | None = None
        self._frame = "aligned"
        self._sample_limit: int | None = None
        self._samples_seen = 0

    @property
    def frame(self) -> str:
        """The frame the ground truth is scored in this epoch: ``aligned`` or ``frontal`` (the model's target)."""
        return self._frame

    @property
    def scoring(self) -> bool:
        """True from the start to the end of an epoch whose predictions this callback scores (what
        :class:`lightning_vrn.wandb_media.WandbMedia` follows)."""
        return self._metric is not None

    # ----- validation -----

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = (trainer.current_epoch + 1) % self.every_n_epochs == 0 or trainer.state.fn == TrainerFn.VALIDATING
        if due and not trainer.sanity_checking:
            self._start(trainer, pl_module, self._share(trainer, self.max_val_samples), "val")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._metric is not None:
            self._update(outputs, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._metric is not None:
            self._finish(trainer, pl_module, "val", f"val_epoch{trainer.current_epoch:04d}")

    # ----- test -----

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module, self._share(trainer, self.max_test_samples), "test")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._metric is not None:
            self._update(outputs, batch)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._metric is not None:
            self._finish(trainer, pl_module, "test", "test")

    # ----- the pool -----

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The pool, made when the run starts: its forkserver imports the program while the first epochs run."""
        if self._pool is None:  # DDP ranks on one node share its cores (trainer.num_devices ranks per node)
            self._pool = NMEPool(self.workers or default_workers(trainer.num_devices))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_pool()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._metric is not None:  # its samples still being scored are dropped, not waited for
            self._metric.reset()
            self._metric = None
        self._close_pool()

    def _close_pool(self) -> None:
        if self._own_pool and self._pool is not None:
            self._pool.close()
            self._pool = None

    # ----- shared -----

    @staticmethod
    def _share(trainer: pl.Trainer, limit: int | None) -> int | None:
        """Each process's share of a sample limit."""
        return None if limit is None else math.ceil(limit / trainer.world_size)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, limit: int | None, split: str) -> None:
        """A fresh metric on the module's device (NCCL gathers device tensors), ``split``'s face region, the limit."""
        from lightning_vrn.metrics.nme import NME  # Open3D: imported only where the NME runs

        grid = getattr(pl_module, "grid", None)
        if grid is None:
            raise AttributeError(f"NMECallback needs {type(pl_module).__name__}.grid, the VoxelGrid of its volumes")
        topology = getattr(trainer.datamodule, "topology", None)
        if not callable(topology):
            raise AttributeError(
                "NMECallback needs trainer.datamodule.topology(split)['face_region'] (face-region vertex ids of "
                "the ground-truth mesh); fit/validate/test with a datamodule that provides it"
            )
        face_region = topology(split)["face_region"]
        if face_region is not None:  # None: per-sample topology (scans), every stored vertex is the face
            face_region = np.asarray(face_region)
            if face_region.dtype == bool or not np.issubdtype(face_region.dtype, np.integer):
                raise TypeError(f"face_region of the {split} split must be vertex ids (integers), got dtype "
                                f"{face_region.dtype}; convert a boolean mask with np.flatnonzero(mask)")
            face_region = face_region.astype(np.int64)
        self._face_region = face_region
        self._frame = getattr(pl_module, "target_frame", None) or "aligned"
        options = {} if self.icp_distance_ratio is None else {"icp_distance_ratio": self.icp_distance_ratio}
        self._metric = NME(grid, icp_subsample=self.icp_subsample, pool=self._pool, **options).to(pl_module.device)
        self._sample_limit = limit
        self._samples_seen = 0

    def _update(self, outputs: Any, batch: Mapping[str, Any]) -> None:
        """Score the step's predictions of the batch (up to the sample limit)."""
        from lightning_vrn.metrics.nme import scoring_vertices

        missing = [key for key in ("vertices", "landmarks_3d", "pose", "index") if key not in batch]
        if missing:
            raise KeyError(
                f"NMECallback needs batch keys {missing}: load the ground-truth mesh vertices for validation "
                "and test (the DataModule's eval_vertices option)"
            )
        if not isinstance(outputs, Mapping) or not ({"volume", "volume_logits"} & set(outputs)):
            raise KeyError("NMECallback needs the validation/test step to return a dict with 'volume' (soft "
                           "occupancy) or 'volume_logits' (B, D, H, W); VRNModule's steps do")
        count = len(batch["index"])
        if self._sample_limit is not None:
            count = min(count, self._sample_limit - self._samples_seen)
        if count <= 0:
            return
        volume = predicted_occupancy(outputs, count)
        vertices = batch["vertices"][:count]  # (B, V, 3), or a list of B scans' (V_i, 3)
        vertices = vertices.detach().cpu().numpy() if torch.is_tensor(vertices) else [v.detach().cpu().numpy()
                                                                                     for v in vertices]
        poses = batch["pose"][:count].detach().cpu().numpy()
        gt = [scoring_vertices(v, pose, self._frame) for v, pose in zip(vertices, poses)]
        if self._face_region is not None:
            gt = [v[self._face_region] for v in gt]
        expression = batch["expression"][:count].detach().cpu() if "expression" in batch else None
        self._metric.update(
            volume.cpu(),
            gt,
            outer_interocular(batch["landmarks_3d"][:count].detach().cpu().numpy()),
            batch["pose"][:count, 1].detach().cpu(),
            batch["index"][:count].detach().cpu(),
            expression,
        )
        self._samples_seen += count

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, name: str) -> None:
        """Gather across processes, log the summary and write the report on rank 0."""
        from lightning_vrn.metrics.report import summarise

        metric, self._metric = self._metric, None
        table = metric.per_sample()  # collective under DDP: every process gets the whole table
        summary = summarise(table)
        self.summaries[stage], self.tables[stage] = summary, table
        for logged_name, value in summary_metrics(stage, summary).items():
            value = float("nan") if value is None else value
            # Equal on every process already: sync_dist only averages equal numbers.
            pl_module.log(logged_name, torch.tensor(value, dtype=torch.float32), sync_dist=True)
        if trainer.is_global_zero:
            write_report(self.out_dir or Path(trainer.log_dir or trainer.default_root_dir), name, table)
        metric.reset()


def summary_metrics(stage: str, summary: Mapping[str, Any]) -> dict[str, float | None]:
    """The logged names of an NME summary's values: ``{stage}/nme`` (the mean), ``/nme_median``,
    ``/nme_aligned``, ``/nme_closest``, ``/nme_failed`` and ``/nme_yaw_{lo}_{hi}``."""
    names = {"nme": "nme_mean", "nme_median": "nme_median", "nme_aligned": "nme_aligned_mean",
             "nme_closest": "nme_closest_mean", "nme_failed": "num_failed"}
    names.update({key: key for key in summary if key.startswith("nme_yaw_")})
    return {f"{stage}/{name}": None if summary[key] is None else float(summary[key]) for name, key in names.items()}


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, read-only folder); training stops at once."""


class RunCheckpoint(ModelCheckpoint):
    """``best.ckpt`` by a configurable ``monitor`` and ``mode``, ``last.ckpt`` at every epoch, and a best-so-far value.

    Lightning's ModelCheckpoint (2.6) refreshes ``last.ckpt`` only when it also saves a top-k
    checkpoint, so an epoch that does not improve the monitor would leave ``last.ckpt`` behind and a
    resumed run would repeat it; here ``last.ckpt`` is written at the end of every epoch, and every
    ``settings.every_n_train_steps`` optimiser steps (0: not within epochs). On SIGTERM (a scheduler's
    preemption) it writes ``last.ckpt`` from the training loop, not from the signal handler. A
    checkpoint that cannot be written stops training at once with :class:`CheckpointWriteError`
    naming the file and the OS error. After each validation the best score so far is logged to the
    trainer's loggers as ``{monitor}_best`` (what a sweep optimises). A monitor that is not computed
    every epoch (the validation NME) is allowed: epochs without it keep the best checkpoint as it is.
    """

    def __init__(self, dirpath: str | os.PathLike, settings: CheckpointSettings | None = None):
        settings = settings or CheckpointSettings()
        super().__init__(dirpath=dirpath, filename="best", monitor=settings.monitor, mode=settings.mode,
                         save_last=True, enable_version_counter=False)  # a restart replaces best/last, no -v1 copies
        self.last_every_n_steps = settings.every_n_train_steps

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        try:
            super()._save_checkpoint(trainer, filepath)
        except OSError as error:
            raise CheckpointWriteError(
                f"could not write checkpoint {filepath}: {error.strerror or error}; free disk space or fix the "
                f"folder's permissions, then rerun the same command to resume from the last checkpoint written"
            ) from None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if self.last_every_n_steps and step % self.last_every_n_steps == 0 and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """SIGTERM or Ctrl-C during training: write ``last.ckpt`` so that a rerun resumes from here."""
        super().on_exception(trainer, pl_module, exception)
        interrupted = isinstance(exception, (SIGTERMException, KeyboardInterrupt))
        if interrupted and trainer.training and trainer.global_step > self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning's final ``last.ckpt``, but never from a ``fast_dev_run`` (a smoke test's weights are no run's);
        and a warning when the monitor never appeared (no ``best.ckpt``: the test then uses the last weights)."""
        if not trainer.fast_dev_run:
            super().on_train_end(trainer, pl_module)
            if not self.best_model_path:
                rank_zero_warn(f"checkpoint.monitor {self.monitor!r} was never logged, so no best.ckpt was written; "
                               f"logged: {sorted(trainer.callback_metrics)}")

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if self.monitor in monitor_candidates:
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _epoch_end_save(self, trainer: pl.Trainer) -> None:
        """After each validation (or each epoch without one): the monitor competes for ``best.ckpt``, ``last.ckpt``
        is written, and the best score so far is logged. Lightning skips both when a checkpoint was already
        saved at this step, so an epoch whose last step was a ``last.ckpt`` step never competed for the best."""
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)  # after best: it holds the new best score
        if self.best_model_score is not None:
            for logger in trainer.loggers:
                logger.log_metrics({f"{self.monitor}_best": float(self.best_model_score)}, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_save_on_train_epoch_end(trainer):
            self._epoch_end_save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_save_on_train_epoch_end(trainer):
            self._epoch_end_save(trainer)


class JobRequeued(Exception):
    """Training stopped after saving ``last.ckpt`` because the SLURM job was requeued (not a failure)."""


class SlurmRequeue(pl.Callback):
    """Requeue a SLURM job before its time limit, with a checkpoint saved outside the signal handler.

    SLURM sends SIGUSR1 ahead of the limit (``#SBATCH --signal=SIGUSR1@90``). The handler only sets a
    flag; at the end of the next training step every process agrees to stop, ``checkpoint`` writes
    ``last.ckpt`` from the training loop, rank 0 runs ``scontrol requeue JOB_ID`` and every process raises
    :class:`JobRequeued` (no validation pass first).
    The requeued job reruns the same command, which resumes from the run directory's ``last.ckpt``.
    (Lightning's own requeue saves inside the handler, which users report failing now and then.)
    """

    def __init__(self, job_id: str, checkpoint: "RunCheckpoint"):
        self.job_id, self.checkpoint = str(job_id), checkpoint
        self.signalled = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        self.signalled = False
        self.checkpoint._save_last_checkpoint(trainer, self.checkpoint._monitor_candidates(trainer))
        if trainer.is_global_zero:
            done = subprocess.run(["scontrol", "requeue", self.job_id], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"scontrol requeue {self.job_id} failed ({done.stderr.strip() or done.returncode}); "
                                   f"last.ckpt is saved: submit the job again to resume")
        # Stop at once, on every process: should_stop would first run a validation pass (and the NME) in the
        # 90 s before the time limit, and is ignored before trainer.min_epochs.
        raise JobRequeued(f"SLURM job {self.job_id} requeued; the next start resumes from last.ckpt")


class ProcessGroupExit(pl.Callback):
    """Destroy the ``torch.distributed`` process group when each process exits, before Python finalises
    (:mod:`lightning_vrn.distributed`: without it a gloo process can abort at exit). ``setup`` runs in every
    process once the group exists."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        destroy_process_group_at_exit()
