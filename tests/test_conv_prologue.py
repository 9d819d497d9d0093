"""Pre-activation 1x1 convs (DenseNet): the batch norm + ReLU in front of the conv computed per
tile inside the conv kernel (``backends/tvm/schedules/conv_prologue.py``), exact against
PyTorch. Real TVM builds, compared with PyTorch."""

from __future__ import annotations

import re

import pytest
import torch

from tests.test_schedules import _check
from tests.test_vision_schedules import _enclosing, _fused, _randomize_bn, _scheduled


class DenseLayer(torch.nn.Module):
    """DenseNet's layer: BN -> ReLU -> 1x1 conv -> BN -> ReLU -> 3x3 conv, concatenated."""

    def __init__(self, cin: int, growth: int = 16) -> None:
        super().__init__()
        self.block = torch.nn.Sequential(
            torch.nn.BatchNorm2d(cin), torch.nn.ReLU(), torch.nn.Conv2d(cin, 4 * growth, 1,
                                                                         bias=False),
            torch.nn.BatchNorm2d(4 * growth), torch.nn.ReLU(),
            torch.nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.block(x)), dim=1)


def _dense_net(cin: int = 32, layers: int = 2, transition_out: int = 48) -> torch.nn.Module:
    """A stem conv (so the map is NHWC), dense layers, and a transition (BN, ReLU, 1x1 conv with
    bias, 2x2 average pool)."""
    mods: list[torch.nn.Module] = [torch.nn.Conv2d(3, cin, 3, padding=1)]
    c = cin
    for _ in range(layers):
        mods.append(DenseLayer(c))
        c += 16
    mods += [torch.nn.BatchNorm2d(c), torch.nn.ReLU(), torch.nn.Conv2d(c, transition_out, 1),
             torch.nn.AvgPool2d(2, 2)]
    return _randomize_bn(torch.nn.Sequential(*mods))


@pytest.mark.parametrize("size", [14, 9], ids=["whole-tiles", "row-tail"])
def test_preactivation_convs_fuse_their_batchnorm_and_are_exact(size, tmp_path, caplog):
    torch.manual_seed(0)
    net = _dense_net()
    for m in net.modules():  # affine parameters away from identity, some negative scales
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(-1.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(1, 3, size, size)
    _check(net, (x,), tmp_path, caplog, "tiled-matmul")

    from tvm import tirx

    names = [g.name_hint for g, f in _fused(net, (x,)).functions_items()
             if isinstance(f, tirx.PrimFunc)]
    # The 1x1 convs of the dense layers (whose input map the next concat reads too) carry
    # their batch norm + ReLU, the conv's own epilogue fused after it; no norm kernel of its
    # own remains. The transition's input (the last concat) has no other reader: its norm
    # stays fused into that concat's kernel.
    assert len([n for n in names if "conv2d_prologue" in n]) == 2, names
    assert all(re.search(r"conv2d_prologue\d*_subtract", n) for n in names
               if "conv2d_prologue" in n), names
    assert not [n for n in names if n.startswith("fused_subtract")], names
    assert len([n for n in names if n.startswith("fused_concatenate") and "subtract" in n]) \
        == 1, names


def test_prologue_is_computed_per_tile_on_channel_vectors():
    """The normalized map is never materialized: the prologue block sits inside the kernel's
    parallel tile loop, its channel loop vectorized."""
    torch.manual_seed(0)
    net = _dense_net(cin=32, layers=1)
    x = torch.randn(1, 3, 14, 14)
    kernels = {n: t for n, t in _scheduled(net, (x,)).items() if "conv2d_prologue" in n}
    assert kernels
    for name, text in kernels.items():
        loops = _enclosing(text, "conv_prologue")
        task = next(i for i, ln in enumerate(loops) if "T.parallel" in ln)
        assert "T.vectorized" in loops[-1], (name, loops)
        # once per row tile: its own loops right under the task loop, not under a panel loop
        # (28 row tasks, 2 output panels of 32 channels each, walked inside the task)
        assert all(ln.lstrip().startswith("for ax") for ln in loops[task + 1:]), (name, loops)
        update = _enclosing(text, "conv2d_nhwc_update")
        assert len(update) > task + 1 and "T.parallel" in update[task], (name, update)


def test_norm_with_another_reader_is_left_alone(tmp_path, caplog):
    """A ReLU output read by something besides the conv keeps its own kernel (fusing it would
    compute the norm twice), and stays exact."""

    class TwoReaders(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 32, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(32)
            self.conv = torch.nn.Conv2d(32, 32, 1)

        def forward(self, x):
            y = torch.relu(self.bn(torch.cat((self.stem(x), self.stem(x) * 2), 1)[:, :32]))
            return self.conv(y) + y

    torch.manual_seed(0)
    net = _randomize_bn(TwoReaders())
    x = torch.randn(1, 3, 10, 10)
    _check(net, (x,), tmp_path, caplog, "tiled-matmul")
    from tvm import tirx

    names = [g.name_hint for g, f in _fused(net, (x,)).functions_items()
             if isinstance(f, tirx.PrimFunc)]
    assert not [n for n in names if "conv2d_prologue" in n], names
