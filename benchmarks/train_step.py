"""Training-step throughput of a config's network: ``python -m benchmarks.train_step [--config paper]``.

Times forward + the model's loss + backward + the model's optimiser step (``configure_optimizers``)
on random inputs of the config's grid, for each precision (fp32, and bf16-mixed autocast where the
device supports it), and prints samples/s. The README's CPU row (the paper config on 2 CPU threads) comes
from running this; its GPU numbers come from ``benchmarks.gpu_check`` (below).

``--loss-tail`` times the loss alone instead: the mean BCE of the bilinear x4 of random low-resolution
logits ``(B, D, H/4, W/4)`` + its backward, through the full-size logits (the model's loss) against the
fused loss (``model.fused_loss``, :mod:`lightning_vrn.nets.upsampled_bce`): seconds (both in one process,
taking turns) and the peak resident memory each adds (each in a fresh process), and their ratios, in one
run (benchmarks/results_train_step.md).

:func:`step_function` (one training step as a closure) and :func:`time_step_function` (its
synchronised timing) are also what ``benchmarks.gpu_check`` times its settings with; this module's
top level imports only torch and ``lightning_vrn.nets`` (the GPU machine has no OmegaConf: the config is read
in :func:`main`).
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lightning_vrn.nets.upsampled_bce import upsampled_bce_with_logits
from lightning_vrn.nets.vrn import upsample

PRECISIONS = ("32-true", "bf16-mixed")


def step_function(model, batch: Mapping[str, torch.Tensor], precision: str = "32-true", *,
                  optimizer: torch.optim.Optimizer | None = None,
                  loss: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
                  cuda_graphs: bool = False) -> Callable[[], torch.Tensor]:
    """One training step of ``model`` on ``batch`` as a closure returning the step's detached loss.

    Forward and loss run under ``precision`` (``"32-true"``, or ``"bf16-mixed"``: bf16 autocast on
    the batch's device), then backward and the optimiser step. ``optimizer``: default the model's own
    (``model.configure_optimizers()["optimizer"]``); ``loss(batch)``: default the model's own training loss,
    ``model.losses(model.stage_outputs(batch, "train"), batch)["loss"]`` (the fused loss when the model's
    settings ask). ``cuda_graphs``: mark each step as a new CUDA-graph step (for a loss compiled with
    ``mode="reduce-overhead"``, whose outputs the next step overwrites).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if optimizer is None:
        optimizer = model.configure_optimizers()["optimizer"]
    if loss is None:
        def loss(batch):
            return model.losses(model.stage_outputs(batch, "train"), batch)["loss"]
    device_type = batch["image"].device.type

    def step() -> torch.Tensor:
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            value = loss(batch)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        return value.detach().clone() if cuda_graphs else value.detach()

    return step


@dataclass(frozen=True)
class StepTiming:
    """What :func:`time_step_function` measured."""

    seconds: float  # median seconds per timed step
    first_s: float  # seconds of the first step (compilation and autotuning included)
    steps: int      # timed steps
    loss: float     # the last timed step's loss


def time_step_function(step: Callable[[], torch.Tensor], device: torch.device, steps: int, warmup: int = 2,
                       max_s: float | None = None) -> StepTiming:
    """Time ``step()``, each call synchronised on ``device``.

    ``warmup`` untimed steps (at least one; the first is timed alone as ``first_s``), then ``steps``
    timed ones; with ``max_s``, timing stops once ``max_s`` seconds have passed and at least three steps
    are timed.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    start = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    times, start = [], time.perf_counter()
    while len(times) < steps and (max_s is None or len(times) < 3 or time.perf_counter() - start < max_s):
        sync()
        began = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - began)
    return StepTiming(seconds=statistics.median(times), first_s=first, steps=len(times), loss=float(loss))


def time_steps(model, batch: dict, precision: str, steps: int, device: torch.device) -> float:
    """Median seconds per optimiser step of the model's own loss and optimiser (after two warm-up steps)."""
    return time_step_function(step_function(model, batch, precision), device, steps).seconds


LOSS_TAILS = ("plain", "fused")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def tail_loss(tail: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BCE of the bilinear x4 of ``logits`` ``(B, D, h, w)`` against ``target`` ``(B, D, H, W)``: through the
    full-size logits (``plain``: the model's loss without ``fused_loss``) or without them (``fused``)."""
    if tail == "plain":
        return F.binary_cross_entropy_with_logits(upsample(logits, target.shape[-2:]), target)
    return upsampled_bce_with_logits(logits, target)


def tail_step(tail: str, batch: int, shape: tuple[int, int, int]) -> Callable[[], tuple[float, torch.Tensor]]:
    """``step() -> (loss, gradient)``: :func:`tail_loss` and its backward on seeded random logits
    ``(batch, D, H/4, W/4)`` and a binary float32 target ``(batch, D, H, W)`` (``shape`` = (D, H, W))."""
    generator = torch.Generator().manual_seed(0)
    depth, height, width = shape
    logits = (3 * torch.randn(batch, depth, height // 4, width // 4, generator=generator)).requires_grad_()
    target = (torch.rand(batch, depth, height, width, generator=generator) > 0.5).float()

    def step():
        loss = tail_loss(tail, logits, target)
        return loss.item(), torch.autograd.grad(loss, logits)[0]

    return step


def time_loss_tails(batch: int, shape: tuple[int, int, int], steps: int, threads: int) -> dict[str, dict]:
    """Per tail of :data:`LOSS_TAILS`: median seconds of ``steps`` loss + backward steps, the tails taking turns
    (after a warm-up of each), so that both see the same load on a shared machine; the loss and the gradient."""
    torch.set_num_threads(threads)
    run = {tail: tail_step(tail, batch, shape) for tail in LOSS_TAILS}
    times, results = {tail: [] for tail in LOSS_TAILS}, {}
    for round_ in range(steps + 1):
        for tail, step in run.items():
            start = time.perf_counter()
            loss, grad = step()
            if round_:
                times[tail].append(time.perf_counter() - start)
            results[tail] = {"loss": loss, "grad": grad}
    return {tail: {**results[tail], "seconds": statistics.median(times[tail])} for tail in LOSS_TAILS}


def resident_kib(field: str) -> int:
    """``VmRSS`` (resident memory now) or ``VmHWM`` (its peak) of this process, KiB (Linux /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory_mib(tail: str, batch: int, shape: tuple[int, int, int], threads: int) -> float:
    """The peak resident memory (MiB) that a loss + backward step of ``tail`` adds over its inputs, after a warm-up
    step (which pages in the kernels' code). Linux with glibc: blocks over 128 KiB are mapped and unmapped as
    they are allocated and freed (a fixed mmap threshold, set before anything is allocated), so the peak follows
    the live tensors rather than what the heap keeps."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    torch.set_num_threads(threads)
    step = tail_step(tail, batch, shape)
    step()
    libc.malloc_trim(0)
    before = resident_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the resident memory now
    step()
    return (resident_kib("VmHWM") - before) / 1024


def in_fresh_process(function, *args):
    """``function(*args)`` in a new Python process (spawned: nothing allocated here is in it)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def compare_loss_tails(batch: int, shape: tuple[int, int, int], steps: int) -> str:
    """Seconds (:func:`time_loss_tails`) and peak memory (:func:`peak_memory_mib`, one process per tail) of the plain
    and the fused loss, and their agreement; a markdown table."""
    threads = torch.get_num_threads()
    results = in_fresh_process(time_loss_tails, batch, shape, steps, threads)
    for tail in LOSS_TAILS:
        results[tail]["peak_mib"] = in_fresh_process(peak_memory_mib, tail, batch, shape, threads)
    plain, fused = results["plain"], results["fused"]
    loss_error = abs(fused["loss"] - plain["loss"]) / plain["loss"]
    grad_error = float((fused["grad"] - plain["grad"]).abs().max() / plain["grad"].abs().max())
    lines = [f"loss + backward, batch {batch}, grid {'x'.join(map(str, shape))}, {threads} threads, median of {steps}",
             "", "| loss | s | peak memory added (MiB) |", "|---|---|---|"]
    lines += [f"| {tail} | {results[tail]['seconds']:.3f} | {results[tail]['peak_mib']:.0f} |" for tail in LOSS_TAILS]
    lines += [f"| fused / plain | {fused['seconds'] / plain['seconds']:.2f}x | "
              f"{fused['peak_mib'] / plain['peak_mib']:.3f}x |", "",
              f"loss {plain['loss']:.7f} (plain), relative difference {loss_error:.1e}; gradient max difference "
              f"{grad_error:.1e} of max |grad|"]
    return "\n".join(lines)


def main(argv=None) -> None:
    from experiments.config import CONFIG_DIR, load_config
    from experiments.train import build_model_from_config
    from lightning_vrn.geometry import VoxelGrid

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="paper", help="config name in experiments/configs")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's global batch size")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--loss-tail", action="store_true",
                        help="time the loss alone, plain against fused, on the CPU (module docstring)")
    args = parser.parse_args(argv)
    cfg = load_config(CONFIG_DIR / f"{args.config}.yaml")
    grid = VoxelGrid.parse(cfg.grid)
    batch_size = args.batch_size or cfg.data.batch_size
    if args.loss_tail:
        print(compare_loss_tails(batch_size, grid.shape, args.steps))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model_from_config(cfg).to(device).train()
    batch = {
        "image": torch.rand(batch_size, 3, grid.height, grid.width, device=device),
        "volume": (torch.rand(batch_size, *grid.shape, device=device) > 0.5).float(),
    }
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch)
    params = sum(p.numel() for p in model.parameters())
    print(f"config {args.config}: grid {grid.describe()}, {params:,} parameters, "
          f"{counter.get_total_flops() / batch_size / 1e9:.2f} GFLOP forward per sample, device {device}")
    precisions = ["32-true"] + (["bf16-mixed"] if device.type == "cuda" and torch.cuda.is_bf16_supported() else [])
    print("| precision | batch | s/step | samples/s |\n|---|---|---|---|")
    for precision in precisions:
        seconds = time_steps(model, batch, precision, args.steps, device)
        print(f"| {precision} | {batch_size} | {seconds:.3f} | {batch_size / seconds:.1f} |")


if __name__ == "__main__":
    main()
