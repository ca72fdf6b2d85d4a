"""Phase 4, ``paper_run``: a short bf16-mixed ``pytorch_lightning.Trainer`` run of the paper model on the
data phase's train split (loss curve, throughput), an evaluation pass on its test split (BCE, voxel IoU),
and ``OUT/paper_run.ckpt`` (bf16 weights) reloaded with ``load_model`` on the CPU."""

from __future__ import annotations

import math
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Mapping

import torch

from benchmarks.gpu_check.context import Context
from benchmarks.gpu_check.phase_data import datamodule, existing_data
from benchmarks.gpu_check.report import plain


def save_checkpoint(model, path: Path) -> int:
    """``load_model``-readable checkpoint with bf16 floating tensors; returns its size in bytes."""
    import pytorch_lightning as pl

    from lightning_vrn.atomic import atomic_path

    state = {key: (value.detach().to("cpu", torch.bfloat16) if value.is_floating_point() else value.detach().cpu())
             .contiguous() for key, value in model.state_dict().items()}
    payload = {"variant": model.variant, "hyper_parameters": plain(dict(model.hparams)), "state_dict": state,
               "pytorch-lightning_version": pl.__version__, "saved_by": "benchmarks.gpu_check"}
    model.on_save_checkpoint(payload)  # whatever this version of the module records (variant, settings)
    with atomic_path(path) as temp:
        torch.save(payload, temp)
    return path.stat().st_size


def evaluation_pass(ctx: Context, model, batch: int) -> dict:
    """Mean of the model's own loss (per-voxel BCE) and voxel IoU (its metric: logit > 0) of ``model`` on the
    test split, bf16 autocast on the device.

    Returns ``{"bce", "iou", "samples", "last_batch"}`` (the last batch as the model saw it).
    """
    from lightning_vrn.metrics.iou import VoxelIoU

    dm = datamodule(ctx, batch, 0, test=True)
    dm.setup("test")
    iou, bce, count = VoxelIoU().to(ctx.device), 0.0, 0
    model.eval()
    with torch.no_grad(), torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.cuda):
        for raw in dm.test_dataloader():
            finished = dm.on_after_batch_transfer(ctx.to_device(raw), 0)
            outputs = model(finished)
            n = finished["image"].shape[0]
            bce += float(model.losses(outputs, finished)["loss"]) * n
            iou.update(outputs["volume_logits"], finished["volume"])
            count += n
    return {"bce": bce / count, "iou": float(iou.compute()), "samples": count, "last_batch": finished}


def check_reload(ctx: Context, model, path: Path, batch: dict) -> None:
    """Load the checkpoint with ``load_model`` on the CPU; compare its occupancy with the trained model's."""
    from lightning_vrn.models import load_model

    loaded = load_model(path)
    image = batch["image"][:1].float().cpu()
    with torch.no_grad():
        predicted = loaded.predict_step({"image": image})
        reference = torch.sigmoid(model.eval().float()(
            {"image": image.to(ctx.device)})["volume_logits"].float()).cpu()
    if tuple(predicted.shape) != (1, *ctx.grid.shape):
        raise ValueError(f"reloaded model predicts {tuple(predicted.shape)}, expected (1, {ctx.grid.shape})")
    agree = float(((predicted > 0.5) == (reference > 0.5)).float().mean())
    ctx.rec.add("paper_run", "reloaded bf16 checkpoint: occupancy agreement", agree, "fraction",
                f"load_model on the CPU vs the trained fp32 model, one test image; max |p| difference "
                f"{float((predicted - reference).abs().max()):.3f}")


def phase_paper_run(ctx: Context) -> None:
    import pytorch_lightning as pl

    rec, s = ctx.rec, ctx.sizes
    existing_data(ctx)
    if ctx.train_path is None or ctx.test_path is None:
        raise RuntimeError(f"no train/test files in {ctx.args.data_dir}: run the data phase first")
    batch = ctx.args.run_batch or s.run_batch
    workers = ctx.best_workers if ctx.best_workers is not None else min(8, os.cpu_count() or 1)
    channels_last = ctx.cuda
    if ("bf16+CL", batch) in ctx.rates and ("bf16", batch) in ctx.rates:
        channels_last = ctx.rates[("bf16+CL", batch)] > ctx.rates[("bf16", batch)]
    model = ctx.build_model()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    class StepLog(pl.Callback):
        def __init__(self):
            self.losses, self.times, self.samples = [], [], 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
            self.losses.append(loss.detach().float())
            self.times.append(time.perf_counter())
            self.samples += batch["image"].shape[0]

    log = StepLog()
    max_time = min(s.run_max_s, ctx.left("paper_run") - s.run_after_s)
    if max_time < 5:
        raise RuntimeError(f"only {ctx.left('paper_run'):.0f} s left: no time to train")
    trainer = pl.Trainer(accelerator="gpu" if ctx.cuda else "cpu", devices=1, precision="bf16-mixed",
                         max_time=timedelta(seconds=max_time), max_steps=s.run_max_steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, benchmark=ctx.cuda or None,
                         callbacks=[log], log_every_n_steps=50)
    dm = datamodule(ctx, batch, workers)
    print(f"[paper_run] Trainer: bf16-mixed, batch {batch}, {workers} workers, device augmentation, "
          f"channels_last {channels_last}, max_time {max_time:.0f} s", flush=True)
    path = Path(ctx.args.out) / "paper_run.ckpt"
    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=dm)
    finally:
        wall = time.perf_counter() - start
        if log.losses:
            size = save_checkpoint(model, path)
            rec.add("paper_run", "checkpoint size", size / 2**20, "MiB", f"{path.name}, bf16 weights",
                    path=str(path), under_16_mib=size < 16 * 2**20)
    losses = torch.stack(log.losses).cpu()
    steps = len(losses)
    k = max(1, min(50, steps // 5))
    rate = (log.samples - k * batch) / (log.times[-1] - log.times[k - 1]) if steps > k else float("nan")
    rec.add("paper_run", "optimiser steps", trainer.global_step, "steps",
            f"batch {batch}, {trainer.current_epoch + 1} epoch(s) started, fit wall time {wall:.0f} s "
            f"(max_time {max_time:.0f} s)", fit_wall_s=wall, epochs=trainer.current_epoch + 1, batch=batch,
            channels_last=channels_last, workers=workers)
    rec.add("paper_run", "samples seen", log.samples, "samples", f"train split {ctx.train_path.name}")
    if math.isfinite(rate):
        rec.add("paper_run", "training throughput (after the first steps)", rate, "samples/s",
                f"steps {k}..{steps}; includes device augmentation and Lightning overhead")
    curve = [float(c.mean()) for c in losses.chunk(min(10, steps))]
    rec.add("paper_run", f"train loss, mean of the first {k} steps", float(losses[:k].mean()), "BCE")
    rec.add("paper_run", f"train loss, mean of the last {k} steps (final)", float(losses[-k:].mean()), "BCE",
            "loss curve in tenths: " + ", ".join(f"{v:.4f}" for v in curve), curve=curve)
    model = model.to(ctx.device)
    result = evaluation_pass(ctx, model, batch)
    rec.add("paper_run", f"test BCE ({result['samples']} samples)", result["bce"], "BCE",
            f"no augmentation; {ctx.test_path.name}")
    rec.add("paper_run", f"test voxel IoU ({result['samples']} samples)", result["iou"], "IoU", "logit > 0")
    check_reload(ctx, model, path, result["last_batch"])
