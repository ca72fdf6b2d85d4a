"""Train a model: ``python -m experiments.train --config experiments/configs/NAME.yaml [key=value ...]``.

Every run gets its own directory, ``runs/{name}/{YYYYmmdd-HHMMSS}-{hash}`` (the hash is of the
resolved config), so repeated runs and sweep trials never resume or overwrite each other. Resuming
is explicit: ``run_dir=PATH`` always means exactly that directory (continued from its
``checkpoints/last.ckpt`` unless ``resume=false``), and ``resume=PATH`` continues the run directory
or checkpoint at PATH.

A run directory holds the resolved config (``config.yaml``), the command line (``command.txt``),
checkpoints (``checkpoints/best.ckpt`` by ``checkpoint.monitor`` and ``checkpoints/last.ckpt``),
metrics per step and epoch (``csv/version_N/metrics.csv``, one per attempt), the final metrics
(``metrics.json``, the test NME exactly as the test report has it) and the NME reports (``nme/``:
per-sample tables and summaries, the same files ``experiments.evaluate`` writes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
from datetime import datetime
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from datamodules import FaceVolumeDataModule
from experiments.config import ConfigError, load_config, save_config
from lightning_vrn.atomic import write_text
from lightning_vrn.callbacks import NMECallback, RunCheckpoint
from lightning_vrn.geometry import VoxelGrid
from lightning_vrn.models import VRNModule, build_model

RUN_DIR_ENV = "LIGHTNING_VRN_RUN_DIR"
"""Set by the first process to the run directory it chose, so that DDP processes it launches use the same one."""


def build_datamodule(cfg: DictConfig, model: VRNModule) -> FaceVolumeDataModule:
    """The DataModule a config describes, serving what ``model`` needs (target frame, heatmaps)."""
    data = cfg.data
    return FaceVolumeDataModule(
        train_path=data.train or None,
        val_path=data.val or None,
        test_path=data.test or None,
        grid=model.grid.to_dict(),
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        augment=OmegaConf.to_container(data.augment),
        heatmap_sigma=model.heatmap_sigma,
        target_volume=model.target_frame or "aligned",
        seed=cfg.seed,
        pin_memory=data.pin_memory,
        persistent_workers=data.persistent_workers,
    )


def build_model_from_config(cfg: DictConfig) -> VRNModule:
    """The model of ``cfg.model`` on ``cfg.grid``."""
    settings = OmegaConf.to_container(cfg.model)
    return build_model(settings.pop("name"), grid=VoxelGrid.parse(cfg.grid).to_dict(), **settings)


def build_trainer(cfg: DictConfig, run_dir: Path) -> pl.Trainer:
    """A Trainer writing checkpoints, CSV metrics (and W&B when enabled) into ``run_dir``."""
    # One CSV per attempt (csv/version_N/metrics.csv), so a resumed run never overwrites the last one.
    loggers = [CSVLogger(save_dir=str(run_dir), name="csv")]
    if cfg.logger.wandb:
        from pytorch_lightning.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                name=cfg.name,
                save_dir=str(run_dir),
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        )
    callbacks = [
        RunCheckpoint(run_dir / "checkpoints", monitor=cfg.checkpoint.monitor, mode=cfg.checkpoint.mode),
        LearningRateMonitor(logging_interval="epoch"),
    ]
    if cfg.nme.every_n_epochs:
        callbacks.append(NMECallback(every_n_epochs=cfg.nme.every_n_epochs, max_val_samples=cfg.nme.max_val_samples,
                                     icp_distance_ratio=cfg.nme.icp_distance_ratio, out_dir=run_dir / "nme"))
    trainer_args = {k: v for k, v in OmegaConf.to_container(cfg.trainer).items() if v is not None}
    return pl.Trainer(default_root_dir=str(run_dir), logger=loggers, callbacks=callbacks, **trainer_args)


def config_hash(cfg: DictConfig) -> str:
    """Six hex digits identifying a resolved config."""
    return hashlib.sha1(OmegaConf.to_yaml(cfg, resolve=True).encode()).hexdigest()[:6]


def new_run_dir(cfg: DictConfig, root: Path = Path("runs")) -> Path:
    """A fresh ``root/{name}/{YYYYmmdd-HHMMSS}-{hash}`` directory (``-2``, ``-3``... if taken), created."""
    stem = root / cfg.name / f"{datetime.now():%Y%m%d-%H%M%S}-{config_hash(cfg)}"
    for attempt in range(1, 1000):
        path = stem if attempt == 1 else stem.with_name(f"{stem.name}-{attempt}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run directory beside {stem}")


def resolve_run(cfg: DictConfig) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (None: start fresh), as the config asks.

    ``resume=PATH`` (a run directory or a checkpoint file) continues that run; an explicit ``run_dir``
    is used as it is (resumed from its ``last.ckpt`` when ``resume`` is true and one exists); neither
    gives a new directory.
    """
    if isinstance(cfg.resume, str):
        target = Path(cfg.resume)
        checkpoint = target / "checkpoints" / "last.ckpt" if target.is_dir() else target
        if not checkpoint.is_file():
            raise ConfigError(f"resume={cfg.resume}: no checkpoint at {checkpoint}; name a run directory holding "
                              f"checkpoints/last.ckpt or a .ckpt file")
        run_dir = target if target.is_dir() else checkpoint.resolve().parent.parent
        if cfg.run_dir and Path(cfg.run_dir).resolve() != run_dir.resolve():
            raise ConfigError(f"resume={cfg.resume} belongs to run directory {run_dir}, but run_dir={cfg.run_dir}; "
                              f"set only one of them")
        return run_dir, checkpoint
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
        last = run_dir / "checkpoints" / "last.ckpt"
        return run_dir, last if cfg.resume and last.is_file() else None
    if rank_zero_only.rank > 0:  # a DDP process: use the directory the first process chose
        if not os.environ.get(RUN_DIR_ENV):
            raise ConfigError("processes started outside Lightning (torchrun, srun) cannot agree on a new run "
                              "directory: set run_dir=PATH explicitly")
        return Path(os.environ[RUN_DIR_ENV]), None
    run_dir = new_run_dir(cfg)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir, None


@rank_zero_only
def _record_run(cfg: DictConfig, run_dir: Path, command: str) -> None:
    """The resolved config and command line of this attempt, written once (rank 0) into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    if command:
        write_text(run_dir / "command.txt", command + "\n")


def train(cfg: DictConfig, command: str = "") -> dict:
    """Fit (resuming as the config says), then test with the best checkpoint; returns the final metrics.

    The metrics include ``run_dir``, ``best_checkpoint`` and its score, and the test NME summary
    (``test/nme``, ...) exactly as the test report writes it.
    """
    run_dir, resume_from = resolve_run(cfg)
    fast_dev_run = bool(cfg.trainer.get("fast_dev_run"))
    if fast_dev_run:
        resume_from = None
    _record_run(cfg, run_dir, command)

    pl.seed_everything(cfg.seed, workers=True)
    model = build_model_from_config(cfg)
    datamodule = build_datamodule(cfg, model)
    trainer = build_trainer(cfg, run_dir)
    if resume_from:
        rank_zero_info(f"resuming from {resume_from}")
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if not fast_dev_run:
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path or None
        test_results = trainer.test(model, datamodule=datamodule, ckpt_path=best)
        metrics.update({k: float(v) for k, v in (test_results[0] if test_results else {}).items()})
        nme = next((c for c in trainer.callbacks if isinstance(c, NMECallback)), None)
        if nme is not None and "test" in nme.summaries:  # exact values, not the logged float32 copies
            summary = nme.summaries["test"]
            metrics.update({"test/nme": summary["nme_mean"], "test/nme_median": summary["nme_median"],
                            "test/nme_aligned": summary["nme_aligned_mean"]})
        metrics["best_checkpoint"] = best
        if checkpoint.best_model_score is not None:
            metrics[f"{checkpoint.monitor}_best"] = float(checkpoint.best_model_score)
    metrics["run_dir"] = str(run_dir)
    if trainer.is_global_zero:
        write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. experiments/configs/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_epochs=5")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        parser.error(str(error))
    command = shlex.join([sys.executable, "-m", "experiments.train", *(argv if argv is not None else sys.argv[1:])])
    try:
        metrics = train(cfg, command)
    except ConfigError as error:
        parser.error(str(error))
    print(f"run directory: {metrics['run_dir']}")
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
