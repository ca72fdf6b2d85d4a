"""The session's state that the phases share: arguments, sizes, device, grid, recorder, deadlines, and
what earlier phases measured for the later ones."""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from benchmarks.gpu_check.budget import phase_deadline
from benchmarks.gpu_check.report import Recorder
from benchmarks.gpu_check.sizes import Sizes
from lightning_vrn.geometry.grid import VoxelGrid


@dataclass
class Context:
    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    grid: VoxelGrid
    rec: Recorder
    reserves: dict
    end: float
    matmul_flops: float | None = None      # measured bf16 matmul FLOP/s
    train_flops_per_sample: float | None = None
    rates: dict = field(default_factory=dict)     # (variant name, batch) -> samples/s
    peaks: dict = field(default_factory=dict)     # (variant name, batch) -> peak GiB (CUDA)
    compiled: dict = field(default_factory=dict)  # variant name -> compiled callable
    best_workers: int | None = None
    train_path: Path | None = None
    test_path: Path | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def net_settings(self) -> dict:
        return dict(self.sizes.net)

    def deadline(self, phase: str) -> float:
        """End of ``phase``: the session's end less the margin and the time reserved for the later phases."""
        return phase_deadline(self.end, self.sizes.margin_s, self.reserves, phase)

    def left(self, phase: str) -> float:
        return self.deadline(phase) - time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def to_device(self, batch: Any) -> Any:
        if torch.is_tensor(batch):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, Mapping):
            return {key: self.to_device(value) for key, value in batch.items()}
        return batch

    def build_model(self):
        """The paper's VRN on the session's grid and network sizes, with the model's default (the paper's)
        optimiser settings."""
        from lightning_vrn.models import build_model

        return build_model("vrn", grid=self.grid.to_dict(), net=self.net_settings)
