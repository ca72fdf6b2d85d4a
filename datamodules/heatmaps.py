"""Landmark heatmaps: one unnormalised 2D Gaussian (peak 1) per landmark, for VRN-Guided and VRN-Multitask."""

from __future__ import annotations

import torch


def gaussian_heatmaps(landmarks_2d: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """``(B, L, 2)`` landmark crop pixels ``(x, y)`` -> ``(B, L, height, width)`` Gaussians.

    Heatmap ``[b, l, row, col] = exp(-((col - x)^2 + (row - y)^2) / (2 sigma^2))`` with ``sigma``
    in pixels; it is 1 at a landmark that sits on a pixel centre. Built as the outer product of
    two 1D Gaussians, in the landmarks' float dtype (float32 for integer input) and device.
    """
    if landmarks_2d.ndim != 3 or landmarks_2d.shape[-1] != 2:
        raise ValueError(f"landmarks_2d must be (B, L, 2), got {tuple(landmarks_2d.shape)}")
    if sigma <= 0:
        raise ValueError(f"heatmap sigma must be positive (pixels), got {sigma}")
    dtype = landmarks_2d.dtype if landmarks_2d.is_floating_point() else torch.float32
    landmarks_2d = landmarks_2d.to(dtype)
    cols = torch.arange(width, dtype=dtype, device=landmarks_2d.device)
    rows = torch.arange(height, dtype=dtype, device=landmarks_2d.device)
    scale = -0.5 / float(sigma) ** 2
    along_x = torch.exp(scale * (cols - landmarks_2d[..., 0:1]) ** 2)  # (B, L, W)
    along_y = torch.exp(scale * (rows - landmarks_2d[..., 1:2]) ** 2)  # (B, L, H)
    return along_y[..., :, None] * along_x[..., None, :]
