"""Transposing copies run in tiles (``fallback._tiled_transpose``): vectorized along the
output's innermost axis alone, an NCHW -> NHWC copy of 32 x 32 planes read one float per
4 KiB-apart row per lane and thrashed L1 (MobileViTV2: 0.30 ms a transpose, 0.048 tiled).
Real TVM builds, compared with PyTorch."""

from __future__ import annotations

import re

import pytest
import torch

from tests.test_schedules import _check
from tests.test_vision_schedules import _scheduled


class Permute(torch.nn.Module):
    def __init__(self, axes: tuple[int, ...]) -> None:
        super().__init__()
        self.axes = axes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 2.0).permute(*self.axes).contiguous()


@pytest.mark.parametrize("shape,axes", [((1, 128, 32, 32), (0, 2, 3, 1)),
                                        ((1, 32, 32, 128), (0, 3, 1, 2)),
                                        ((2, 48, 16, 20), (0, 2, 3, 1))],
                         ids=["nchw-to-nhwc", "nhwc-to-nchw", "rows-no-tile-divides"])
def test_transpose_is_tiled_and_exact(shape, axes, tmp_path, caplog):
    torch.manual_seed(0)
    net = Permute(axes).eval()
    inputs = (torch.randn(*shape),)
    (text,) = [t for n, t in _scheduled(net, inputs).items() if "transpose" in n]
    # two split axes: 16-float runs of each input row (the tile) and 16-lane output vectors
    tiled = len(set(re.findall(r"\b(ax\d)_1\b", text))) == 2
    assert tiled == (shape[-1] % 16 == 0), text[:2000]  # the input's rows split in whole tiles
    assert not re.search(r"T\.vectorized\(T\.int64\((?!16\))", text), text[:2000]
    _check(net, inputs, tmp_path, caplog, None, tol=1e-12)  # a copy: exact
