"""Ops whose edge values TVM 0.27 could not build or run: zero-sized constants, float division
by a constant zero, orderings of booleans. Real TVM builds, outputs compared with torch."""

from __future__ import annotations

import numpy as np
import torch

import slimc


def _outputs(result, *inputs):
    return list(slimc.load(result.output)(*[x.numpy() for x in inputs]).values())


class _BlockDiag(torch.nn.Module):
    """``torch.block_diag`` of weights: its decomposition concatenates zero-sized pieces."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(3, 3))
        self.b = torch.nn.Parameter(torch.randn(2, 2))

    def forward(self, x):
        return x @ torch.block_diag(self.a, self.b)


def test_block_diag_of_weights_builds(tmp_path):
    """The zero-sized constants were handed to TVM unaligned and with non-compact strides
    ("FromDLPack: Data is not aligned to 64 bytes", exit 1)."""
    torch.manual_seed(0)
    module, x = _BlockDiag().eval(), torch.randn(4, 5)
    result = slimc.compile(module, (x,), output=tmp_path / "bd")
    np.testing.assert_allclose(_outputs(result, x)[0], module(x).detach().numpy(),
                               rtol=1e-5, atol=1e-5)


class _ZeroDivisors(torch.nn.Module):
    def forward(self, x):
        return (torch.nan_to_num(x / 0), torch.nan_to_num(x // 0.0),
                torch.remainder(x, 0.0).isnan(), torch.fmod(x, 0.0).isnan(),
                torch.nan_to_num(x / torch.tensor(-0.0)), (x / 0.0).isnan())


def test_float_division_by_constant_zero_builds(tmp_path):
    """TIR's constant folder stopped on ``x / 0.0`` ("Divide by zero", internal error);
    the artifact now gives IEEE's ±inf / NaN as torch does."""
    x = torch.tensor([[0.0, 1.5, -2.0, float("inf")], [-0.0, 3.0, float("nan"), -1.0]])
    module = _ZeroDivisors().eval()
    result = slimc.compile(module, (x,), output=tmp_path / "zero")
    for got, want in zip(_outputs(result, x), module(x), strict=True):
        np.testing.assert_array_equal(got, want.numpy())


class _BoolOrders(torch.nn.Module):
    def forward(self, x):
        b = x > 0
        return (b.max(1).values, b.max(1).indices, b.min(1).values, b.min(0).indices,
                b.amax(1), b.amin(0), torch.sort(b, 1).values,
                torch.topk(b.to(torch.int8), 2, 1).values)


def test_bool_max_min_sort_run(tmp_path):
    """``(x > 0).max(1)`` failed at run time ("Unsupported input dtype: bool") and bool
    ``amax`` at build time; ties (all-False and all-True rows) take torch's first index."""
    x = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [1.0, 2.0, 3.0, 4.0],
                      [-1.0, 2.0, -3.0, 4.0], [0.0, 0.0, 5.0, 5.0]])
    module = _BoolOrders().eval()
    result = slimc.compile(module, (x,), output=tmp_path / "bools")
    for got, want in zip(_outputs(result, x), module(x), strict=True):
        np.testing.assert_array_equal(got, want.numpy())
