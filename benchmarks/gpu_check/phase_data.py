"""Phase 3, ``data``: synthetic train and test splits generated into ``--data-dir`` (or an earlier run's
reused), the DataModule's train loader with device augmentation against the GPU step per worker count,
and device against CPU decoding. :func:`existing_data` and :func:`datamodule` also serve ``paper_run``."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import torch

from benchmarks.common import median_ms
from benchmarks.gpu_check.context import Context
from benchmarks.gpu_check.steps import best_variant

# tests/test_datamodule.py::test_device_path_on_cuda_matches_cpu_path: rare float64 rounding ties only.
VOXEL_MISMATCH_TOL, IMAGE_ATOL = 1e-4, 1e-4


def generate(ctx: Context, split: str, count: int, workers: int) -> tuple[Path, float | None]:
    """``generate_split`` into the data folder; returns the path and samples/s (None if the file existed)."""
    from data_prep.synthetic import generate_split

    path = Path(ctx.args.data_dir) / f"{split}-{count}.h5"
    existed = path.exists()
    start = time.perf_counter()
    generate_split(path, "builtin", ctx.grid, count, seed=0, split=split, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    ctx.rec.data.setdefault("data", {})[split] = {
        "path": str(path), "num_samples": count, "seed": 0, "split": split, "grid": ctx.sizes.grid,
        "face_model": "builtin", "reused": existed,
        "regenerate": f"python -m data_prep.synthetic --out DIR --split {split}={count} --seed 0 "
                      f"--grid {ctx.sizes.grid}"}
    return path, None if existed else count / seconds


def existing_data(ctx: Context) -> None:
    """Files of an earlier run in the data folder (for ``--phases`` without ``data``)."""
    folder = Path(ctx.args.data_dir)
    for split in ("train", "test"):
        if getattr(ctx, f"{split}_path") is None:
            found = sorted(folder.glob(f"{split}-*.h5"), key=lambda p: int(p.stem.split("-")[1]))
            if found:
                setattr(ctx, f"{split}_path", found[-1])


def datamodule(ctx: Context, batch: int, workers: int, test: bool = False):
    from datamodules.datamodule import FaceVolumeDataModule

    return FaceVolumeDataModule(train_path=ctx.train_path, test_path=ctx.test_path if test else None,
                                grid=ctx.grid.to_dict(), batch_size=batch, num_workers=workers,
                                augment={"enabled": True, "on_device": True}, seed=0, pin_memory=True,
                                persistent_workers=workers > 0, eval_vertices=False)


def loader_rate(ctx: Context, batch: int, workers: int) -> tuple[float, float]:
    """Samples/s of the train loader + ``on_after_batch_transfer`` on the device (after the first batch), startup s."""
    dm = datamodule(ctx, batch, workers)
    dm.setup("fit")
    loader = dm.train_dataloader()

    def batches():
        epoch = 0
        while True:
            loader.sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = batches()
    start = time.perf_counter()
    dm.on_after_batch_transfer(ctx.to_device(next(stream)), 0)
    ctx.sync()
    first = time.perf_counter()
    samples = 0
    while time.perf_counter() - first < ctx.sizes.loader_s:
        out = dm.on_after_batch_transfer(ctx.to_device(next(stream)), 0)
        samples += out["image"].shape[0]
    ctx.sync()
    rate = samples / (time.perf_counter() - first)
    stream.close()
    del stream, loader, dm, out
    gc.collect()
    return rate, first - start


def compare_loader(ctx: Context, batch: int, rate: float) -> str:
    best = best_variant(ctx, batch)
    if best is None:
        return "no GPU step measured at this batch"
    return f"{rate / ctx.rates[(best, batch)]:.2f}x the best GPU step ({best}, {ctx.rates[(best, batch)]:.0f}/s)"


def compare_decoding(ctx: Context) -> None:
    """Decode (unpack + augment) one raw batch of 8 on the CPU and on the device: agreement and time."""
    from torch.utils.data import default_collate

    from datamodules.dataset import FaceVolumeDataset, decode_batch

    dataset = FaceVolumeDataset(ctx.train_path, augment={"enabled": True, "on_device": True}, on_device=True)
    raw = default_collate([dataset.raw_sample(i) for i in range(min(8, len(dataset)))])
    cpu = decode_batch(raw, ctx.grid)
    moved = ctx.to_device(raw)
    dev = {k: v.cpu() if torch.is_tensor(v) else v for k, v in decode_batch(moved, ctx.grid).items()}
    mismatch = float((cpu["volume"] != dev["volume"]).float().mean())
    image_diff = float((cpu["image"] - dev["image"]).abs().max())
    landmark_diff = float((cpu["landmarks_2d"] - dev["landmarks_2d"]).abs().max())
    ok = mismatch < VOXEL_MISMATCH_TOL and image_diff <= IMAGE_ATOL
    n = raw["image_uint8"].shape[0]
    ctx.rec.add("data", f"device vs CPU decode of {n}: equal voxels", 1.0 - mismatch, "fraction",
                f"{'within' if ok else 'OUTSIDE'} the gpu test's tolerance (mismatch < {VOXEL_MISMATCH_TOL}, "
                f"image atol {IMAGE_ATOL}); device {ctx.device.type}", within_tolerance=ok, voxel_mismatch=mismatch)
    ctx.rec.add("data", f"device vs CPU decode of {n}: max image difference", image_diff, "",
                f"max landmark difference {landmark_diff:.2e} px", landmark_diff=landmark_diff)
    cpu_ms = median_ms(lambda: decode_batch(raw, ctx.grid), repeats=3)
    dev_ms = median_ms(lambda: (decode_batch(moved, ctx.grid), ctx.sync()), repeats=10, warmup=2)
    ctx.rec.add("data", f"decode + augment {n} samples on the {ctx.device.type}", dev_ms, "ms",
                f"CPU ({torch.get_num_threads()} threads): {cpu_ms:.0f} ms", cpu_ms=cpu_ms)


def phase_data(ctx: Context) -> None:
    rec, s = ctx.rec, ctx.sizes
    cores = os.cpu_count() or 1
    workers = cores if ctx.cuda else min(2, cores)
    test_workers = workers if ctx.cuda else 1  # --tiny: in-process, no pool to start
    ctx.test_path, rate = generate(ctx, "test", s.test_samples, test_workers)
    if rate:
        rec.add("data", f"generate test split ({s.test_samples}, {test_workers} workers)", rate, "samples/s",
                "includes starting the worker pool")
    existing_data(ctx)
    if ctx.train_path is not None:  # an earlier run's train split: reuse it
        count = int(ctx.train_path.stem.split("-")[1])
    else:  # size the train split to the time left (the test split's rate includes the pool start: pessimistic)
        low, high = s.train_samples
        count = int(min(high, max(low, (rate or 0) * (ctx.left("data") - s.loader_reserve_s))))
    ctx.train_path, rate = generate(ctx, "train", count, workers)
    if rate:
        rec.add("data", f"generate train split ({count}, {workers} workers)", rate, "samples/s",
                "samples written per second of generate_split, pool start included")
    else:
        rec.skip("data", "generate train split", f"reused {ctx.train_path}")
    large, rates = max(s.batches), {}
    for workers in s.loader_workers:
        if ctx.left("data") < s.loader_s + 5:
            rec.skip("data", f"loader {workers} workers", "out of phase time")
            continue
        with rec.attempt("data", f"loader {workers} workers b{large}"):
            rate, startup = loader_rate(ctx, large, workers)
            rates[workers] = rec.add("data", f"train loader + device augmentation, {workers} workers, b{large}", rate,
                                     "samples/s", f"{compare_loader(ctx, large, rate)}; first batch after "
                                     f"{startup:.1f} s", startup_s=startup)
    if rates:
        ctx.best_workers = max(rates, key=rates.get)
        if s.run_batch != large and ctx.left("data") > s.loader_s + 5:
            with rec.attempt("data", f"loader b{s.run_batch}"):
                rate, startup = loader_rate(ctx, s.run_batch, ctx.best_workers)
                rec.add("data", f"train loader + device augmentation, {ctx.best_workers} workers, b{s.run_batch}",
                        rate, "samples/s", compare_loader(ctx, s.run_batch, rate), startup_s=startup)
    with rec.attempt("data", "device vs CPU decoding"):
        compare_decoding(ctx)
