"""Train a VRN variant: ``python -m experiments.train --config experiments/configs/NAME.yaml [key=value ...]``.

Every run directory gets the resolved config (``config.yaml``), the command line (``command.txt``),
checkpoints (``checkpoints/best.ckpt`` by validation loss and ``checkpoints/last.ckpt``), metrics per
step and epoch (``csv/version_N/metrics.csv``, one per attempt), the final metrics (``metrics.json``)
and per-sample NME tables (``nme/``).
Re-running the same command resumes from ``last.ckpt`` (set ``resume=false`` to start over).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from datamodules import FaceVolumeDataModule
from experiments.config import ConfigError, load_config, save_config
from lightning_vrn.atomic import write_text
from lightning_vrn.callbacks import NMECallback
from lightning_vrn.geometry import VoxelGrid
from lightning_vrn.models import build_model


def build_datamodule(cfg: DictConfig) -> FaceVolumeDataModule:
    """The DataModule a config describes."""
    data = cfg.data
    return FaceVolumeDataModule(
        train_path=data.train,
        val_path=data.val,
        test_path=data.test,
        grid=VoxelGrid.parse(cfg.grid).to_dict(),
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        augment=OmegaConf.to_container(data.augment),
        heatmap_sigma=data.heatmap_sigma,
        target_volume=data.target_volume,
        seed=cfg.seed,
    )


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
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="best",
            monitor="val/loss",
            mode="min",
            save_last=True,
            enable_version_counter=False,  # a restarted run replaces best/last instead of adding -v1 copies
        ),
        LearningRateMonitor(logging_interval="epoch"),
    ]
    if cfg.nme.every_n_epochs:
        callbacks.append(
            NMECallback(
                every_n_epochs=cfg.nme.every_n_epochs, max_val_samples=cfg.nme.max_val_samples, out_dir=run_dir / "nme"
            )
        )
    trainer_args = {k: v for k, v in OmegaConf.to_container(cfg.trainer).items() if v is not None}
    return pl.Trainer(default_root_dir=str(run_dir), logger=loggers, callbacks=callbacks, **trainer_args)


@rank_zero_only
def _record_run(cfg: DictConfig, run_dir: Path, command: str) -> None:
    """The resolved config and command line of this attempt, written once (rank 0) into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    if command:
        write_text(run_dir / "command.txt", command + "\n")


def train(cfg: DictConfig, command: str = "") -> dict:
    """Fit (resuming when possible), then test with the best checkpoint; returns the final metrics."""
    run_dir = Path(cfg.run_dir)
    _record_run(cfg, run_dir, command)

    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    model = build_model(
        cfg.model.name,
        grid=VoxelGrid.parse(cfg.grid).to_dict(),
        net=OmegaConf.to_container(cfg.model.net),
        optim=OmegaConf.to_container(cfg.model.optim),
    )
    trainer = build_trainer(cfg, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    resume_from = str(last) if cfg.resume and last.is_file() and not cfg.trainer.fast_dev_run else None
    if resume_from:
        rank_zero_info(f"resuming from {resume_from}")
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if not cfg.trainer.fast_dev_run:
        best = trainer.checkpoint_callback.best_model_path or None
        test_results = trainer.test(model, datamodule=datamodule, ckpt_path=best)
        metrics.update({k: float(v) for k, v in (test_results[0] if test_results else {}).items()})
        metrics["best_checkpoint"] = best
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
    metrics = train(cfg, command)
    print(f"run directory: {cfg.run_dir}")
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
