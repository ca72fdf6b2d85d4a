"""Training-step throughput of a config's network: ``python -m benchmarks.train_step [--config paper]``.

Times forward + BCE + backward + RMSprop step on random inputs of the config's grid, for each
precision (fp32, and bf16-mixed autocast where the device supports it), and prints samples/s.
The README's GPU row comes from running this on a CUDA machine.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from experiments.config import CONFIG_DIR, load_config
from lightning_vrn.geometry import VoxelGrid
from lightning_vrn.models import build_model


def time_steps(model, batch: dict, precision: str, steps: int, device: torch.device) -> float:
    """Median seconds per optimiser step."""
    optimizer = model.configure_optimizers()["optimizer"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    times = []
    for step in range(steps + 2):  # two warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = model.losses(model(batch), batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="paper", help="config name in experiments/configs")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's global batch size")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    cfg = load_config(CONFIG_DIR / f"{args.config}.yaml")
    grid = VoxelGrid.parse(cfg.grid)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = args.batch_size or cfg.data.batch_size
    model = build_model(cfg.model.name, grid=grid.to_dict(), net=dict(cfg.model.net), optim=dict(cfg.model.optim))
    model = model.to(device).train()
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
