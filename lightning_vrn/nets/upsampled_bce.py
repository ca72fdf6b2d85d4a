"""Mean BCE of bilinearly upsampled logits without the full-size logits: the fused loss (``model.fused_loss``).

VRN's loss is ``BCE(U z, y)``: the head's logits ``z`` ``(B, D, h, w)`` upsampled by :func:`upsample` to
``(B, D, H, W)`` (4x) against the target ``y``. Bilinear upsampling with ``align_corners=False`` is
separable and linear, ``U z = A z B^T`` per depth slice, with ``A`` ``(H, h)`` and ``B`` ``(W, w)`` the 1-D
interpolation matrices (:func:`interpolation_matrix`). Per voxel ``BCE(x, y) = softplus(x) - y x``, so

    sum BCE = sum softplus(A z B^T) - sum((A^T y B) * z)        (sum(y * A z B^T) = sum((A^T y B) * z))
    d sum BCE / dz = A^T sigmoid(A z B^T) B - A^T y B

The target enters only through its projection ``P = A^T y B`` ``(B, D, h, w)`` (:func:`target_projection`,
16x fewer values at 4x), and the full-size logits are made a chunk of depth slices at a time, in the
forward (softplus) and again in the backward (sigmoid): peak memory is a chunk, not the volume, and only
``z`` and ``P`` are kept for the backward. Softplus is PyTorch's (linear above 20, which is off by under
2e-9 per voxel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from lightning_vrn.nets.vrn import upsample

CHUNK_VOXELS = 2**22
"""Full-size voxels computed at once (whole depth slices, at least one): 16 MiB of float32 logits per chunk.
Products with a full-size operand keep it on the left, ``(k, H, W) @ (W, w)``, which is one matrix product
without a transposed copy."""


def interpolation_matrix(out_size: int, in_size: int, dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """``(out_size, in_size)``: row ``i`` holds the weights of output ``i`` in 1-D linear interpolation as
    :func:`upsample` does it (``align_corners=False``, source indices clamped at the edges).

    Made by upsampling the identity along one axis, so the weights are ``F.interpolate``'s own.
    """
    identity = torch.eye(in_size, dtype=dtype, device=device).view(1, in_size, in_size, 1)
    return upsample(identity, (out_size, 1))[0, :, :, 0].T


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; anything else (float32, or bf16/fp16 logits under autocast) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _matrices(size: tuple[int, int], low_size: tuple[int, int], dtype: torch.dtype, device: torch.device):
    """``(A, B)``: the interpolation matrices ``(H, h)`` and ``(W, w)`` from ``low_size`` to ``size``."""
    return (interpolation_matrix(size[0], low_size[0], dtype, device),
            interpolation_matrix(size[1], low_size[1], dtype, device))


def _without_autocast(tensor: torch.Tensor) -> torch.autocast:
    """No autocast on ``tensor``'s device: the matrix products must not run in bf16."""
    return torch.autocast(tensor.device.type, enabled=False)


def _slices(volume: torch.Tensor, full_size: tuple[int, int], chunk_voxels: int):
    """``volume`` ``(B, D, m, n)`` as chunks ``(k, m, n)`` of whole depth slices, ``k = chunk_voxels // (H * W)``
    (at least 1) for the full size ``(H, W)``, whatever ``(m, n)`` is (the full or the low resolution)."""
    flat = volume.reshape(-1, *volume.shape[-2:])
    return flat.split(max(1, chunk_voxels // (full_size[0] * full_size[1])))


def target_projection(target: torch.Tensor, low_size: tuple[int, int],
                      chunk_voxels: int = CHUNK_VOXELS) -> torch.Tensor:
    """``U^T y``: the target ``(B, D, H, W)`` (any dtype: float in [0, 1], or uint8 0/1) projected to the logits'
    ``low_size = (h, w)`` by the transposed upsampling, ``A^T y B`` per slice: ``(B, D, h, w)`` float32 (float64
    for a float64 target). Cast and computed ``chunk_voxels`` voxels of the target at a time."""
    size, dtype = tuple(target.shape[-2:]), _compute_dtype(target.dtype)
    with _without_autocast(target):
        rows, cols = _matrices(size, low_size, dtype, target.device)
        chunks = [rows.T @ (chunk.to(dtype) @ cols) for chunk in _slices(target, size, chunk_voxels)]
    return torch.cat(chunks).view(*target.shape[:-2], *low_size)


@torch.compiler.disable  # run eagerly inside a compiled step: its chunk loop would unroll into the graph
def upsampled_bce_with_logits(logits: torch.Tensor, target: torch.Tensor | None = None, *,
                              projection: torch.Tensor | None = None, size: tuple[int, int] | None = None,
                              chunk_voxels: int = CHUNK_VOXELS) -> torch.Tensor:
    """``F.binary_cross_entropy_with_logits(upsample(logits, size), target)`` (mean over voxels) without the
    full-size logits.

    ``logits``: ``(B, D, h, w)`` at the hourglasses' resolution (any float dtype; computed in float32, or
    float64). Give either ``target`` ``(B, D, H, W)`` in [0, 1] (any dtype), or its ``projection``
    (:func:`target_projection`, ``(B, D, h, w)``) and ``size = (H, W)``. ``chunk_voxels``: full-size voxels
    made at once in the forward and the backward. The gradient reaches ``logits`` only (not the target).
    """
    if (target is None) == (projection is None) or (projection is not None and size is None):
        raise ValueError("upsampled_bce_with_logits takes either target, or projection and size")
    if target is not None:
        size = tuple(target.shape[-2:])
        projection = target_projection(target, tuple(logits.shape[-2:]), chunk_voxels)
    if tuple(projection.shape) != tuple(logits.shape):
        raise ValueError(f"logits {tuple(logits.shape)} and target projection {tuple(projection.shape)} differ")
    total = _UpsampledBCE.apply(logits, projection.detach(), tuple(size), chunk_voxels)
    return total / (logits.shape[:-2].numel() * size[0] * size[1])


class _UpsampledBCE(torch.autograd.Function):
    """Sum over voxels of ``BCE(upsample(z), y)`` from ``z`` and ``P = U^T y``; chunked forward and backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, projection: torch.Tensor, size: tuple[int, int],
                chunk_voxels: int) -> torch.Tensor:
        with _without_autocast(logits):
            low = logits.to(_compute_dtype(logits.dtype))
            rows, cols = _matrices(size, low.shape[-2:], low.dtype, low.device)
            # Both sums in float64: at a small loss they are ~1e3 times their difference.
            softplus = sum(F.softplus(rows @ chunk @ cols.T).sum(dtype=torch.float64)
                           for chunk in _slices(low, size, chunk_voxels))
            total = (softplus - (projection.to(low.dtype) * low).sum(dtype=torch.float64)).to(low.dtype)
        ctx.save_for_backward(logits, projection, rows, cols)
        ctx.size, ctx.chunk_voxels = size, chunk_voxels
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: torch.Tensor):
        logits, projection, rows, cols = ctx.saved_tensors
        with _without_autocast(logits):
            low = logits.to(rows.dtype)
            chunks = [rows.T @ (torch.sigmoid_(rows @ chunk @ cols.T) @ cols)
                      for chunk in _slices(low, ctx.size, ctx.chunk_voxels)]
            grad = (torch.cat(chunks).view_as(low) - projection.to(low.dtype)) * grad_total
        return grad.to(logits.dtype), None, None, None
