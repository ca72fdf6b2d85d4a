"""The fused loss (lightning_vrn/nets/upsampled_bce.py): its interpolation matrices are F.interpolate's, its value
and gradient are those of BCE on the upsampled logits (float64 and float32, square and not, chunked or not, under
bf16 autocast), the target projection stands in for the target, and no operation makes a full-size tensor."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_vrn.nets.upsampled_bce import interpolation_matrix, target_projection, upsampled_bce_with_logits
from lightning_vrn.nets.vrn import upsample

TOLERANCE = {torch.float64: {"rtol": 1e-12, "atol": 1e-14}, torch.float32: {"rtol": 2e-6, "atol": 1e-8}}


def logits_and_target(shape, size, dtype, soft=False, seed=0):
    """Random low-resolution logits ``shape`` (B, D, h, w) (leaf, requiring grad) and a target (B, D, *size):
    binary, or uniform in [0, 1] when ``soft``."""
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(shape, generator=gen, dtype=dtype)).requires_grad_()
    target = torch.rand(*shape[:2], *size, generator=gen, dtype=dtype)
    return logits, target if soft else (target > 0.5).to(dtype)


def plain_loss_and_gradient(logits, target):
    """What the model computes without the fused loss: BCE of the upsampled logits, and its gradient."""
    loss = F.binary_cross_entropy_with_logits(upsample(logits, target.shape[-2:]), target)
    return loss, torch.autograd.grad(loss, logits)[0]


def test_the_interpolation_matrix_by_hand_clamps_at_the_edges():
    # 2 -> 8: output i samples the input at (i + 0.5) / 4 - 0.5, clamped to [0, 1] (align_corners=False).
    expected = torch.tensor([[1, 0], [1, 0], [0.875, 0.125], [0.625, 0.375], [0.375, 0.625], [0.125, 0.875],
                             [0, 1], [0, 1]], dtype=torch.float64)
    assert torch.equal(interpolation_matrix(8, 2, torch.float64), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("low, size", [((12, 12), (48, 48)), ((3, 5), (12, 20)), ((5, 3), (13, 7))])
def test_the_separable_product_is_f_interpolate(dtype, low, size):
    z = torch.randn(2, 3, *low, dtype=dtype)
    rows, cols = interpolation_matrix(size[0], low[0], dtype), interpolation_matrix(size[1], low[1], dtype)
    # The weights are equal; only the order of the four products and sums differs (values of order 1).
    atol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(rows @ z @ cols.T, upsample(z, size), rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, size, soft, chunk_voxels", [
    ((2, 6, 4, 4), (16, 16), False, None),          # 4x, as VRN, in one chunk
    ((2, 5, 3, 6), (12, 24), False, 3 * 12 * 24),   # not square; 10 slices in chunks of 3, 3, 3, 1
    ((1, 4, 5, 3), (13, 7), True, 1),               # not 4x, a soft target, a slice per chunk
])
def test_loss_and_gradient_equal_bce_of_the_upsampled_logits(dtype, shape, size, soft, chunk_voxels):
    logits, target = logits_and_target(shape, size, dtype, soft)
    expected, expected_grad = plain_loss_and_gradient(logits, target)
    options = {} if chunk_voxels is None else {"chunk_voxels": chunk_voxels}
    loss = upsampled_bce_with_logits(logits, target, **options)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(loss, expected, **TOLERANCE[dtype])
    torch.testing.assert_close(grad, expected_grad, rtol=TOLERANCE[dtype]["rtol"],
                               atol=TOLERANCE[dtype]["rtol"] * expected_grad.abs().max().item())


def test_the_target_projection_stands_in_for_the_target():
    logits, target = logits_and_target((2, 3, 4, 6), (16, 24), torch.float64)
    projection = target_projection(target, (4, 6), chunk_voxels=16 * 24)
    # U^T y is the gradient of sum(y * U z) with respect to z.
    (by_autograd,) = torch.autograd.grad((target * upsample(logits, (16, 24))).sum(), logits)
    torch.testing.assert_close(projection, by_autograd, rtol=1e-12, atol=1e-12)
    as_uint8 = target_projection(target.to(torch.uint8), (4, 6))
    assert as_uint8.dtype == torch.float32
    torch.testing.assert_close(as_uint8, projection.float())
    torch.testing.assert_close(upsampled_bce_with_logits(logits, projection=projection, size=(16, 24)),
                               upsampled_bce_with_logits(logits, target), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="either target, or projection and size"):
        upsampled_bce_with_logits(logits, target, projection=projection, size=(16, 24))


def test_bf16_logits_under_autocast_are_computed_in_float32():
    logits, target = logits_and_target((2, 4, 6, 6), (24, 24), torch.float32)
    low = logits.detach().to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = upsampled_bce_with_logits(low, target)
    (grad,) = torch.autograd.grad(loss, low)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    expected, expected_grad = plain_loss_and_gradient(low.detach().float().requires_grad_(), target)
    torch.testing.assert_close(loss, expected, rtol=2e-6, atol=0)  # bf16 matrix products would be ~1e-3 off
    torch.testing.assert_close(grad, expected_grad.to(torch.bfloat16))


class LargestOutput(TorchDispatchMode):
    """Records the most elements any operation's output has that is not a view (reshape, split) of its input."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor):
                    self.numel = max(self.numel, tensor.numel())
        return out


def test_no_operation_makes_a_full_size_tensor():
    logits, target = logits_and_target((2, 8, 6, 6), (24, 24), torch.float32)
    full, chunk = target.numel(), 3 * 24 * 24  # 16 slices in chunks of 3
    with LargestOutput() as plain:
        plain_loss_and_gradient(logits, target)
    with LargestOutput() as fused:
        torch.autograd.grad(upsampled_bce_with_logits(logits, target, chunk_voxels=chunk), logits)
    assert plain.numel == full  # the counter sees the full-size logits of the plain loss
    assert fused.numel == chunk
