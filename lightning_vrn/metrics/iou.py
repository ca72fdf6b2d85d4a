"""Voxel IoU of predicted occupancy logits against binary target volumes."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class VoxelIoU(Metric):
    """Mean over samples of the voxel IoU of the predicted occupancy (logit > 0) against a binary target.

    Sum states reduce correctly across DDP processes. A sample whose prediction and target are
    both empty counts as IoU 1.
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("iou_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("samples", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """``logits`` and ``target`` ``(B, ...)``; a voxel is predicted occupied where its logit is > 0
        (probability > 0.5) and is occupied in the target where the target is > 0.5.
        """
        predicted = (logits.detach() > 0).flatten(1).float()
        occupied = (target > 0.5).flatten(1).float()
        intersection = (predicted * occupied).sum(dim=1)
        union = predicted.sum(dim=1) + occupied.sum(dim=1) - intersection
        iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
        self.iou_sum += iou.sum()
        self.samples += iou.numel()

    def compute(self) -> torch.Tensor:
        """Mean IoU over all samples seen since the last reset."""
        return self.iou_sum / self.samples.clamp(min=1)
