"""The low-bit grid search on fused kernels (:mod:`slimc.lowbit_fused`) gives the torch
search's grids bit for bit, and falls back to it wherever that is not guaranteed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimc import lowbit, lowbit_fused

needs_kernels = pytest.mark.skipif(not lowbit_fused.enabled(),
                                   reason="fused grid kernels are built for x86-64 hosts only")


def test_torch_sum_order_is_torchs():
    """The replayed order of torch's float sum equals ``torch.sum`` bit for bit (what the
    kernels' error sums rely on), for every group width the searches use, and a different
    order does not (the check can fail)."""
    lanes = lowbit_fused.torch_lanes()
    if lanes is None:
        pytest.skip("torch's float sum order on this host is not the replayed one")
    rng = np.random.default_rng(1)
    for width in (lanes, 32, 64, 128, 256):
        x = (rng.standard_normal((20000, width)).astype(np.float32) ** 2) * np.float32(1e-4)
        ours = lowbit_fused.torch_sum_order([x[:, j] for j in range(width)], lanes)
        assert np.array_equal(ours, torch.from_numpy(x).sum(dim=1).numpy())
    x = rng.standard_normal((20000, 64)).astype(np.float32)
    plain = np.zeros(20000, np.float32)
    for j in range(64):
        plain += x[:, j]
    assert not np.array_equal(plain, torch.from_numpy(x).sum(dim=1).numpy())


@needs_kernels
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (3, 64), (2, 64)])
def test_fused_search_gives_the_torch_grids(bits, group):
    """Random weights with outliers, a constant group, zero rows, a partial last group and
    weights already on a grid: the same fp16 scales and minimums as the torch search."""
    assert lowbit_fused.kernels(group, bits) is not None
    g = torch.Generator().manual_seed(bits * group)
    w = torch.randn(200, 5 * group + group // 2, generator=g) * 0.03
    w[::9, 7] *= 30
    w[3, :group] = -0.5
    w[4] = 0.0
    on_grid = torch.randint(0, 1 << bits, (20, w.shape[1]), generator=g).float()
    w[-20:] = on_grid * 0.01 - 0.04
    fused = lowbit_fused.search_rows(w, bits, group)
    plain = lowbit._search_rows_torch(w, bits, group)
    assert fused is not None
    for a, b in zip(fused, plain, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a.half().view(torch.int16), b.half().view(torch.int16))  # signs too


@needs_kernels
def test_grid_uses_the_kernels_and_stops_on_an_exact_plain_grid(monkeypatch):
    """``lowbit.grid`` runs the fused search (one kernel call for the plain grid, then one
    for the other 24 shrunk ranges and one per refit), and weights on their own Q4_1 grid
    stop after the first call with the grid that reproduces them."""
    calls = []
    real = lowbit_fused.kernels(32, 4)

    def counted(kernel):
        def call(*args):
            calls.append(args[1].shape[0] if args[1].ndim == 2 else "refit")
            return kernel(*args)
        return call

    monkeypatch.setitem(lowbit_fused._BUILT, (32, 4), tuple(counted(f) for f in real))
    torch.manual_seed(0)
    n, k = 64, 128
    codes = torch.randint(0, 16, (n, k // 32, 32)).float()
    codes[..., 0], codes[..., 1] = 0.0, 15.0
    step = (torch.rand(n, k // 32) * 0.01 + 1e-3).half().float()
    low = (-torch.rand(n, k // 32) * 0.05).half().float()
    weight = (codes * step[..., None] + low[..., None]).reshape(n, k)
    scale, minimum = lowbit._search_rows(weight, 4, 32)
    assert calls == [1]
    back = lowbit._codes(lowbit._grouped(weight, 32), scale, minimum, 15) \
        * scale[..., None] + minimum[..., None]
    assert torch.equal(back.reshape(n, k), weight)
    calls.clear()
    lowbit._search_rows(weight + 1e-4 * torch.randn(n, k), 4, 32)
    assert calls == [1, 24, "refit", 1, "refit", 1]


def test_torch_search_where_the_kernels_cannot_run(monkeypatch):
    """Non-finite weights, a group that is not a multiple of torch's lanes and
    ``SLIMC_FUSED_GRID=0`` take the torch search (``search_rows`` answers None)."""
    w = torch.randn(16, 64)
    w[2, 5] = float("inf")
    assert lowbit_fused.search_rows(w, 4, 32) is None
    lanes = lowbit_fused.torch_lanes()
    if lanes:
        assert lowbit_fused.kernels(lanes + lanes // 2, 4) is None
    monkeypatch.setenv("SLIMC_FUSED_GRID", "0")
    monkeypatch.setattr(lowbit_fused, "_BUILT", {})
    assert lowbit_fused.kernels(32, 4) is None
    scale, minimum = lowbit._search_rows(torch.randn(16, 64), 4, 32)
    assert scale.shape == minimum.shape == (16, 2)
