"""Train a model: ``python -m experiments.train --config experiments/configs/NAME.yaml [key=value ...]``.

Every run gets its own directory, ``runs/{name}/{YYYYmmdd-HHMMSS}-{hash}`` (the hash is of the
resolved config), so repeated runs and sweep trials never resume or overwrite each other. Resuming
is explicit: ``run_dir=PATH`` always means exactly that directory (continued from its
``checkpoints/last.ckpt`` unless ``resume=false``), and ``resume=PATH`` continues the run directory
or checkpoint at PATH (see :mod:`experiments.runs`).

Before anything is written, the config, the data files and any checkpoint to resume from are
checked (a checkpoint whose grid or network the config would not load is refused, naming both, and so
is a learning setting other than the run's: :data:`experiments.runs.LEARNING_SETTINGS`), the
run directory is locked against a second training and tested for writing. Rerunning a run that has
finished (its checkpoint reached ``trainer.max_epochs`` and ``metrics.json`` exists) says so and
changes nothing. A run directory then
holds the resolved config and command line of its first attempt (``config.yaml``, ``command.txt``)
and of every attempt (``attempts/NNN/``, with the attempt's ``metrics.json`` when it finished), checkpoints (``checkpoints/best.ckpt`` by
``checkpoint.monitor``, ``checkpoints/last.ckpt`` at every epoch and every
``checkpoint.every_n_train_steps`` steps), metrics per step and epoch (``csv/version_N/metrics.csv``,
one per attempt), the final metrics (``metrics.json``, the test NME exactly as the test report has
it) and the NME reports (``nme/``: the same files ``experiments.evaluate`` writes).

SIGTERM (what schedulers send before preemption) saves ``last.ckpt`` and exits with 143; rerunning
the same command resumes from it. Exit codes: docs/failures.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from datamodules import FaceVolumeDataModule
from experiments.config import ConfigError, ExperimentSettings, load_config
from experiments.runs import (
    RunLock,
    check_writable,
    changed_learning_settings,
    finished_metrics,
    incompatible_settings,
    record_attempt,
    resolve_run,
    trained_config,
    training_finished,
)
from experiments.wandb_project import upload_run_files, wandb_offline, wandb_run_id
from lightning_vrn.atomic import file_sha256, write_text
from lightning_vrn.callbacks import (
    JobRequeued,
    NMECallback,
    ProcessGroupExit,
    RunCheckpoint,
    SlurmRequeue,
    summary_metrics,
)
from lightning_vrn.cli import EXIT_SIGTERM, run_command
from lightning_vrn.distributed import limit_threads_to_slurm_task
from lightning_vrn.geometry import VoxelGrid
from lightning_vrn.metrics.nme import import_open3d
from lightning_vrn.models import VRNModule, model_class, sigma_at_192
from lightning_vrn.safe_load import load_checkpoint
from lightning_vrn.settings import settings_dict
from lightning_vrn.wandb_media import WandbMedia


class Interrupted(RuntimeError):
    """Training stopped by SIGTERM after saving ``last.ckpt``; the exit code is 143."""

    exit_code = EXIT_SIGTERM


def build_datamodule(cfg: ExperimentSettings, model: VRNModule) -> FaceVolumeDataModule:
    """The DataModule a config describes, serving what ``model`` needs (target frame, heatmaps)."""
    return FaceVolumeDataModule.for_model(model, cfg.data, seed=cfg.seed)


def build_model_from_config(cfg: ExperimentSettings) -> VRNModule:
    """The model of ``cfg.model`` on ``cfg.grid``."""
    return model_class(cfg.model.name)(grid=VoxelGrid.parse(cfg.grid), settings=cfg.model)


def wandb_logger(cfg: ExperimentSettings, run_dir: Path):
    """A W&B logger for ``run_dir``: the run id is :func:`wandb_run_id`'s, so a resumed, requeued or moved run
    logs into the same W&B run; offline without an API key; grouped by the model's name;
    checkpoints uploaded as artifacts at the end of training when online and ``logger.log_checkpoints``."""
    from pytorch_lightning.loggers import WandbLogger

    offline = wandb_offline()
    return WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, name=cfg.name,
                       id=wandb_run_id(cfg, run_dir), resume="allow", group=cfg.logger.group or cfg.model.name, job_type=cfg.logger.job_type,
                       tags=list(cfg.logger.tags), save_dir=str(run_dir), offline=offline,
                       log_model=cfg.logger.log_checkpoints and not offline,
                       config=cfg.to_dict())


def build_trainer(cfg: ExperimentSettings, run_dir: Path) -> pl.Trainer:
    """A Trainer writing checkpoints, CSV metrics (and W&B when enabled) into ``run_dir``."""
    # One CSV per attempt (csv/version_N/metrics.csv), so a resumed run never overwrites the last one.
    loggers = [CSVLogger(save_dir=str(run_dir), name="csv")]
    if cfg.logger.wandb:
        loggers.append(wandb_logger(cfg, run_dir))
    checkpoint = RunCheckpoint(run_dir / "checkpoints", cfg.checkpoint)
    callbacks = [checkpoint, LearningRateMonitor(logging_interval="epoch"), ProcessGroupExit()]
    plugins = []
    if os.environ.get("SLURM_JOB_ID"):  # requeue on SIGUSR1 with the checkpoint saved outside the handler
        callbacks.append(SlurmRequeue(os.environ["SLURM_JOB_ID"], checkpoint))
        plugins.append(SLURMEnvironment(auto_requeue=False))
    if cfg.nme.every_n_epochs:
        nme = NMECallback(cfg.nme, out_dir=run_dir / "nme")
        callbacks.append(nme)
        if cfg.logger.wandb:  # after the NME callback, whose epochs and tables it follows
            callbacks.append(WandbMedia(nme, samples=cfg.logger.media_samples))
    trainer_args = {k: v for k, v in cfg.trainer.items() if v is not None}
    return pl.Trainer(default_root_dir=str(run_dir), logger=loggers, callbacks=callbacks, plugins=plugins,
                      **trainer_args)


def check_resumable(checkpoint: Path, model: VRNModule, cfg: ExperimentSettings, trust: bool, run_dir: Path) -> dict:
    """Refuse, before anything is written, a checkpoint that cannot be read safely, that the config would not load,
    or whose run was trained with other learning settings (:func:`changed_learning_settings`: a resumed run keeps
    its checkpoint's optimiser and schedule, so a new learning rate would be recorded but never used). Returns the
    checkpoint's contents."""
    try:
        payload = load_checkpoint(checkpoint, trust=trust)
    except ValueError as error:  # damaged, or unsafe (UnsafeFileError is a ValueError)
        raise ConfigError(f"cannot resume from {checkpoint}: {error}. Start over with resume=false, or delete "
                          f"the checkpoint") from None
    if sigma_at_192(payload):
        raise ConfigError(f"cannot resume from {checkpoint}: it was saved by an earlier lightning-vrn that gave "
                          f"model.sigma at a 192 px crop, and this one gives model.sigma_px in the crop's own pixels, so the "
                          f"run would go on with other maps. Score it with experiments.evaluate (which converts "
                          f"it), or train anew (resume=false)")
    record = payload.get("lightning_vrn") or {}
    hparams = payload.get("hyper_parameters") or {}
    differences = incompatible_settings(hparams, settings_dict(cfg.model), model.grid.to_dict(),
                                        model.variant, record.get("variant"))
    if differences:
        raise ConfigError(f"the config does not match the checkpoint it would resume ({checkpoint}): "
                          f"{'; '.join(differences)}. Use the checkpoint's settings, start over with resume=false, "
                          f"or train into another run_dir")
    trained = trained_config(run_dir) or {"model": {k: v for k, v in hparams.items() if k != "grid"}}
    changed = changed_learning_settings(trained, cfg)
    if changed:
        raise ConfigError(f"resuming {run_dir} would keep what it was trained with, not {'; '.join(changed)}: "
                          f"resume with the run's values, or train these settings as a new run (another run_dir, "
                          f"or resume=false to start this one over)")
    return payload


def train(cfg: ExperimentSettings, command: str = "", trust_checkpoint: bool = False) -> dict:
    """Fit (resuming as the config says), then test with the best checkpoint; returns the final metrics.

    The metrics include ``run_dir``, ``best_checkpoint`` and its score, and the test NME summary
    (``test/nme``, ...) exactly as the test report writes it. Raises :class:`Interrupted` after
    SIGTERM (``last.ckpt`` saved).
    """
    run_dir, resume_from = resolve_run(cfg)
    fresh = not run_dir.exists() or not any(run_dir.iterdir())
    try:
        model, datamodule, trainer, finished = _checked_setup(cfg, run_dir, resume_from, trust_checkpoint)
    except BaseException:
        if fresh:
            _remove_empty_folders(run_dir)  # a refused start leaves no empty run directory behind
        raise
    if finished and (final := finished_metrics(run_dir)) is not None:
        rank_zero_info(f"{run_dir} has finished: its checkpoint reached trainer.max_epochs (or max_steps) and its "
                       f"test is in metrics.json, so nothing is run and nothing in it changes. Raise "
                       f"trainer.max_epochs to train on; score it on other data with experiments.evaluate")
        return final
    with RunLock(run_dir, command) if rank_zero_only.rank == 0 else _NoLock() as lock:
        for note in lock.notes:
            rank_zero_info(note)
        attempt = record_attempt(cfg, run_dir, command)
        if resume_from:
            rank_zero_info(f"resuming from {resume_from}")
        try:
            try:
                trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None,
                            weights_only=not trust_checkpoint)
            except JobRequeued as requeued:
                rank_zero_info(f"{requeued}: {run_dir / 'checkpoints' / 'last.ckpt'}")
                metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
                return {**metrics, "requeued": True, "run_dir": str(run_dir)}
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            if not trainer.fast_dev_run:
                metrics.update(_test(trainer, model, datamodule, run_dir))
        except SystemExit as stop:
            raise _interruption(stop, trainer, run_dir) from None
        metrics["run_dir"] = str(run_dir)
        if trainer.is_global_zero:  # the run's latest results, and this attempt's own (a later attempt replaces the first)
            for folder in (attempt, run_dir):
                write_text(folder / "metrics.json", json.dumps(_plain_json(metrics), indent=2, sort_keys=True))
        _finish_wandb(trainer, run_dir)
    return metrics


def _finish_wandb(trainer: pl.Trainer, run_dir: Path) -> None:
    """Save the run's config, metrics and test NME table into its W&B run (for ``compare --wandb``), then close
    the W&B run (its files are complete only then; the next run in this process starts a new one)."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            if trainer.is_global_zero:
                upload_run_files(logger.experiment, run_dir)
            logger.experiment.finish()


def _checked_setup(cfg: ExperimentSettings, run_dir: Path, resume_from: Path | None, trust: bool):
    """The model, DataModule and Trainer, after every check that can run before the run directory is written, and
    whether the checkpoint to resume from already finished the training the config asks for."""
    if cfg.trainer.get("fast_dev_run") and (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise ConfigError(f"trainer.fast_dev_run is a smoke test: run it in a fresh run_dir, not in {run_dir}, "
                          f"which holds a run's checkpoints")
    if cfg.checkpoint.monitor.startswith("val/nme") and not cfg.nme.every_n_epochs:
        raise ConfigError(f"checkpoint.monitor={cfg.checkpoint.monitor} needs the validation NME: set "
                          f"nme.every_n_epochs to a positive number of epochs (and train a model that predicts "
                          f"a volume)")
    if cfg.nme.every_n_epochs:
        try:
            import_open3d()
        except ImportError as error:
            raise ConfigError(str(error)) from None
    pl.seed_everything(cfg.seed, workers=True)
    model = build_model_from_config(cfg)
    datamodule = build_datamodule(cfg, model)
    datamodule.check_files("fit")
    finished = False
    if resume_from and not cfg.trainer.get("fast_dev_run"):
        finished = training_finished(check_resumable(resume_from, model, cfg, trust, run_dir), cfg.trainer)
    check_writable(run_dir / "checkpoints")
    trainer = build_trainer(cfg, run_dir)
    limit_threads_to_slurm_task(trainer.num_devices)  # before any step: the node's ranks may share a task
    return model, datamodule, trainer, finished


def _interruption(stop: SystemExit, trainer: pl.Trainer, run_dir: Path) -> BaseException:
    """What a SystemExit from Lightning means: SIGTERM (exit 143) or Ctrl-C (exit 130), with what was saved."""
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = f"{last} holds the last checkpoint: rerun the same command to resume" if last.is_file() else \
        "no checkpoint was written yet"
    if isinstance(stop, SIGTERMException):
        return Interrupted(f"stopped by SIGTERM; {saved}")
    if trainer.interrupted:
        return KeyboardInterrupt(f"interrupted; {saved}")
    return stop


def _remove_empty_folders(folder: Path) -> None:
    """Remove ``folder`` and its subfolders if they hold no file."""
    if folder.is_dir() and not any(path.is_file() for path in folder.rglob("*")):
        for path in sorted(folder.rglob("*"), reverse=True):
            path.rmdir()
        folder.rmdir()


def _plain_json(metrics: dict) -> dict:
    """NaN -> None, so metrics.json is strict JSON."""
    return {k: None if isinstance(v, float) and v != v else v for k, v in metrics.items()}


def _test(trainer: pl.Trainer, model: VRNModule, datamodule: FaceVolumeDataModule, run_dir: Path) -> dict:
    """Test the best checkpoint of this run directory; the test metrics, with the NME summary's exact values and
    ``test_file_sha256``, the test file's content identity (``compare --runs`` pairs runs' faces by it)."""
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path or None
    if best and Path(best).resolve().parent != (run_dir / "checkpoints").resolve():  # a moved or copied run
        own = run_dir / "checkpoints" / "best.ckpt"
        best = str(own) if own.is_file() else None
    results = trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    nme = next((c for c in trainer.callbacks if isinstance(c, NMECallback)), None)
    if nme is not None and "test" in nme.summaries:  # exact values, not the logged float32 copies
        metrics.update(summary_metrics("test", nme.summaries["test"]))
    metrics["best_checkpoint"] = best
    if trainer.is_global_zero:  # read once, by the process that writes metrics.json
        metrics["test_file_sha256"] = file_sha256(datamodule.hparams.test_path)
    if checkpoint.best_model_score is not None:
        metrics[f"{checkpoint.monitor}_best"] = float(checkpoint.best_model_score)
    return metrics


class _NoLock:
    """What processes other than rank 0 hold: nothing (rank 0 holds the run directory's lock)."""

    notes: list[str] = []

    def __enter__(self) -> "_NoLock":
        return self

    def __exit__(self, *exc) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. experiments/configs/quickstart.yaml")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="resume from a checkpoint that holds more than tensors and plain values (runs its code)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_epochs=5")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come before or after --options
    cfg = load_config(args.config, args.overrides)
    command = shlex.join(redact([sys.executable, "-m", "experiments.train", *(sys.argv[1:] if argv is None else argv)]))
    metrics = train(cfg, command, trust_checkpoint=args.trust_checkpoint)
    print(f"run directory: {metrics['run_dir']}")
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


SECRET_WORDS = ("key", "token", "secret", "password")


def redact(arguments: list[str]) -> list[str]:
    """Command-line arguments with the value of any ``NAME=value`` whose name mentions a secret replaced by ``***``."""
    out = []
    for argument in arguments:
        name, sep, _ = argument.partition("=")
        out.append(f"{name}=***" if sep and any(word in name.lower() for word in SECRET_WORDS) else argument)
    return out


if __name__ == "__main__":
    sys.exit(run_command(main))
