"""``scatter_add`` / ``scatter_reduce`` and integer bit shifts: TVM 0.27 had no converter (exit
2, "cannot lower op(s) scatter_add.default, scatter_reduce.two" / "__lshift__.Scalar"), found
by the session-24 hunt. Duplicate indices,
``include_self`` both ways, ``src`` larger than ``index``; one real TVM build."""

from __future__ import annotations

import numpy as np
import torch

import slimc


class _Scatters(torch.nn.Module):
    def forward(self, x: torch.Tensor, idx: torch.Tensor):
        base = torch.ones(4, 6)
        return (base.scatter_add(1, idx, x),
                base.scatter_reduce(1, idx, x, reduce="amax", include_self=False),
                base.scatter_reduce(1, idx, x, reduce="amin"),
                base.scatter_reduce(1, idx, x, reduce="prod", include_self=False),
                torch.zeros(3, 6).scatter_add(1, idx[:3, :2], x),  # src larger than index
                (idx << 3) + (idx >> 1) + torch.bitwise_left_shift(idx, idx % 4)
                - ((idx - 9) >> 2))  # arithmetic >> of negatives


def test_scatters_and_bit_shifts_compute_what_torch_does(tmp_path):
    torch.manual_seed(0)
    module = _Scatters().eval()
    x, idx = torch.randn(4, 3), torch.tensor([[0, 0, 5], [1, 2, 1], [3, 3, 3], [4, 0, 2]])
    result = slimc.compile(module, (x, idx), target="x86", output=tmp_path / "scatter")
    compiled = slimc.load(result.output)
    fresh = torch.randn(4, 3)  # same indices (duplicates included), values it was not built on
    got = list(compiled(fresh.numpy(), idx.numpy()).values())
    want = module(fresh, idx)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.numpy().dtype
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-6)
