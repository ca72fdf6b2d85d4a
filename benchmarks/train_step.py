"""Training-step throughput of a config's network: ``python -m benchmarks.train_step [--config paper]``.

Times forward + the model's loss + backward + the model's optimiser step (``configure_optimizers``)
on random inputs of the config's grid, for each precision (fp32, and bf16-mixed autocast where the
device supports it), and prints samples/s. The README's CPU row (the paper config on 2 CPU threads) comes
from running this; its GPU numbers come from ``benchmarks.gpu_check`` (below).

:func:`step_function` (one training step as a closure) and :func:`time_step_function` (its
synchronised timing) are also what ``benchmarks.gpu_check`` times its settings with; this module's
top level imports only torch (the GPU machine has no OmegaConf: the config is read in :func:`main`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode

PRECISIONS = ("32-true", "bf16-mixed")


def step_function(model, batch: Mapping[str, torch.Tensor], precision: str = "32-true", *,
                  optimizer: torch.optim.Optimizer | None = None,
                  loss: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
                  cuda_graphs: bool = False) -> Callable[[], torch.Tensor]:
    """One training step of ``model`` on ``batch`` as a closure returning the step's detached loss.

    Forward and loss run under ``precision`` (``"32-true"``, or ``"bf16-mixed"``: bf16 autocast on
    the batch's device), then backward and the optimiser step. ``optimizer``: default the model's own
    (``model.configure_optimizers()["optimizer"]``); ``loss(batch)``: default the model's own,
    ``model.losses(model(batch), batch)["loss"]``. ``cuda_graphs``: mark each step as a new CUDA-graph
    step (for a loss compiled with ``mode="reduce-overhead"``, whose outputs the next step overwrites).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if optimizer is None:
        optimizer = model.configure_optimizers()["optimizer"]
    if loss is None:
        def loss(batch):
            return model.losses(model(batch), batch)["loss"]
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


def main(argv=None) -> None:
    from experiments.config import CONFIG_DIR, load_config
    from experiments.train import build_model_from_config
    from lightning_vrn.geometry import VoxelGrid

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="paper", help="config name in experiments/configs")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's global batch size")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    cfg = load_config(CONFIG_DIR / f"{args.config}.yaml")
    grid = VoxelGrid.parse(cfg.grid)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = args.batch_size or cfg.data.batch_size
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
