"""Dense convs to channel counts no whole vector divides compute padded outputs and slice
(``conv_output_padding``): ShuffleNetV2's 232-channel 1 x 1 convs over 7 x 7 pixels ran on
8-lane panels on AVX-512. Real TVM builds, compared with PyTorch."""

from __future__ import annotations

import torch

from tests.test_schedules import _check
from tests.test_vision_schedules import _kernel_names, _randomize_bn, _scheduled


def test_padded_channel_counts():
    from slimc.backends.tvm.schedules.conv_output_padding import padded_channels

    assert padded_channels(232, 16, True) == 256  # two vectors: +10%
    assert padded_channels(244, 16, True) == 256
    assert padded_channels(136, 16, True) == 144  # one vector: +6% (two would add 18%)
    assert padded_channels(240, 16, True) is None  # whole vectors already
    assert padded_channels(24, 16, True) is None  # a third more work: left alone
    assert padded_channels(232, 16, False) is None  # Zen 4: 8-lane panels lose nothing
    assert padded_channels(116, 8, True) == 128  # AVX2: 4-lane panels otherwise


class ShuffleUnit(torch.nn.Module):
    """ShuffleNetV2's stage-4 unit over 7 x 7 pixels: one branch's 1 x 1 conv + BN + ReLU to
    232 channels, concatenated with the other half and channel-shuffled."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(240, 232, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(232)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        z = torch.cat((other, y), 1)
        n, c, h, w = z.shape
        return z.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


def test_shuffle_unit_conv_runs_whole_vectors_and_is_exact(tmp_path, caplog):
    """The conv computes 256 channels (zero filters past 232) with its folded batch norm and
    ReLU, the slice back to 232 fuses into a kernel, and the unit matches PyTorch."""
    torch.manual_seed(0)
    net = _randomize_bn(ShuffleUnit()).eval()
    inputs = (torch.randn(1, 240, 7, 7), torch.randn(1, 232, 7, 7))
    names = _kernel_names(net, inputs, "x86-64-v4-vnni")
    assert any("conv2d" in n and "strided_slice" in n for n in names), names
    conv = next(t for n, t in _scheduled(net, inputs).items() if "conv2d" in n)
    assert "T.int64(1), T.int64(1), T.int64(240), T.int64(256)" in conv, conv[:1500]  # HWIO
    assert "T.vectorized(T.int64(8))" not in conv
    _check(net, inputs, tmp_path, caplog, None, tol=1e-5, target="x86-64-v4-vnni")


class ConvResidual(torch.nn.Module):
    """A 3 x 3 conv to 232 channels, its bias, then a residual add of a runtime tensor: the
    padding runs through the bias, and the slice comes before the add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(64, 232, 3, padding=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.hardtanh(self.conv(x) + skip, -1.0, 1.0) * 2.0


def test_residual_conv_is_sliced_before_the_runtime_operand(tmp_path, caplog):
    torch.manual_seed(0)
    net = ConvResidual().eval()
    inputs = (torch.randn(1, 64, 9, 9), torch.randn(1, 232, 9, 9))
    names = _kernel_names(net, inputs, "x86-64-v4-vnni")
    assert any("strided_slice" in n for n in names), names
    _check(net, inputs, tmp_path, caplog, None, tol=1e-5, target="x86-64-v4-vnni")
    _check(net, inputs, tmp_path, caplog, None, tol=1e-5, target="llvm")
