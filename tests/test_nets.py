"""Networks: output shapes, shape preservation, parameter count against the architecture formula."""

import pytest
import torch

from torch import nn

from lightning_vrn.nets import ConvHead, Hourglass, HourglassStack, Residual, Stem, VRNNet, upsample
from lightning_vrn.nets.landmark_net import LandmarkNet


# ----- an independent parameter count from the architecture description (docs/paper.md, "Network") -----


def conv_params(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out  # weights + bias


def bn_params(c: int) -> int:
    return 2 * c  # scale + shift


def residual_params(c_in: int, c_out: int) -> int:
    """BN-ReLU-1x1(c_in->c_out/2), BN-ReLU-3x3(c_out/2), BN-ReLU-1x1(->c_out), 1x1 skip if widths differ."""
    mid = c_out // 2
    body = bn_params(c_in) + conv_params(c_in, mid, 1) + bn_params(mid) + conv_params(mid, mid, 3)
    body += bn_params(mid) + conv_params(mid, c_out, 1)
    return body + (conv_params(c_in, c_out, 1) if c_in != c_out else 0)


def hourglass_params(depth: int, f: int) -> int:
    """Per level: skip, down and up residuals; the innermost level has one more residual."""
    inner = hourglass_params(depth - 1, f) if depth > 1 else residual_params(f, f)
    return 3 * residual_params(f, f) + inner


def vrn_params(in_channels: int, out_channels: int, f: int, stacks: int, depth: int) -> int:
    stem = conv_params(in_channels, f // 4, 7) + bn_params(f // 4)
    stem += residual_params(f // 4, f // 2) + residual_params(f // 2, f // 2) + residual_params(f // 2, f)
    per_stack = hourglass_params(depth, f) + residual_params(f, f) + 2 * (conv_params(f, f, 1) + bn_params(f))
    merges = (stacks - 1) * conv_params(f, f, 1)
    head = conv_params(f, out_channels, 1)
    return stem + stacks * per_stack + merges + head


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_residual_parameter_count_by_hand():
    # 256 -> 128 -> 128 -> 256 bottleneck written out: BN 512, 1x1 32896, BN 256, 3x3 147584, BN 256, 1x1 33024.
    assert count(Residual(256, 256)) == 214_528
    assert count(Residual(256, 256)) == residual_params(256, 256)
    assert count(Residual(64, 128)) == residual_params(64, 128)


def test_paper_config_parameter_count_matches_architecture_formula():
    net = VRNNet(out_channels=200, in_channels=3, features=256, stacks=2, hourglass_depth=4)
    assert count(net) == vrn_params(3, 200, 256, 2, 4)
    assert 6.5e6 < count(net) < 7.0e6  # docs/paper.md, "Network": about 6.7 M for a standard hourglass VRN


def test_paper_config_output_shape():
    net = VRNNet(out_channels=200).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, 192, 192))
    assert out.shape == (1, 200, 192, 192)
    assert torch.isfinite(out).all()


def test_quickstart_config_output_shape():
    net = VRNNet(out_channels=100, features=64, stacks=2, hourglass_depth=3)
    out = net(torch.rand(2, 3, 96, 96))
    assert out.shape == (2, 100, 96, 96)


def test_input_channels_parameter_for_guided_input():
    net = VRNNet(out_channels=16, in_channels=71, features=32, stacks=1, hourglass_depth=2)
    assert net(torch.rand(2, 71, 32, 32)).shape == (2, 16, 32, 32)
    assert count(net) == vrn_params(71, 16, 32, 1, 2)
    with pytest.raises(ValueError, match=r"expects \(B, 71, S, S\)"):
        net(torch.rand(2, 3, 32, 32))


def test_blocks_preserve_spatial_size():
    x = torch.rand(2, 16, 16, 16)
    assert Residual(16, 16)(x).shape == (2, 16, 16, 16)
    assert Residual(16, 32)(x).shape == (2, 32, 16, 16)
    assert Hourglass(3, 16)(x).shape == (2, 16, 16, 16)
    assert HourglassStack(2, 16, 2)(x).shape == (2, 16, 16, 16)
    assert Stem(3, 16)(torch.rand(2, 3, 32, 32)).shape == (2, 16, 8, 8)


def test_hourglass_rejects_sizes_it_cannot_halve():
    with pytest.raises(ValueError, match="divisible by 8"):
        Hourglass(3, 16)(torch.rand(1, 16, 12, 12))


class TwoLayerHead(nn.Module):
    """Another head: 3x3 conv + ReLU + 1x1 conv (any module from ``(features, out_channels)`` will do)."""

    def __init__(self, features: int, out_channels: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(features, features, 3, padding=1), nn.ReLU(), nn.Conv2d(features, out_channels, 1))

    def forward(self, features):
        return self.layers(features)


def test_the_head_is_a_constructor_argument_and_its_output_is_upsampled_to_the_crop():
    torch.manual_seed(0)
    net = VRNNet(out_channels=8, features=16, stacks=1, hourglass_depth=2, head=TwoLayerHead).eval()
    assert isinstance(net.head, TwoLayerHead)
    assert count(net) == vrn_params(3, 8, 16, 1, 2) - conv_params(16, 8, 1) + conv_params(16, 16, 3) + conv_params(16, 8, 1)
    image = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = upsample(net.head(net.hourglasses(net.stem(image))), (32, 32))
        assert torch.equal(net(image), expected)
    landmarks = LandmarkNet(num_landmarks=5, features=16, stacks=2, hourglass_depth=2, head=TwoLayerHead)
    assert all(isinstance(head, TwoLayerHead) for head in landmarks.heads)
    assert landmarks(image).shape == (2, 2, 5, 32, 32)


def test_the_paper_head_keeps_its_checkpoint_keys():
    net = VRNNet(out_channels=8, features=16, stacks=1, hourglass_depth=2)
    assert isinstance(net.head, ConvHead)
    assert {"head.conv.weight", "head.conv.bias"} <= set(net.state_dict())
