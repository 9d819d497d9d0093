"""Group norm decomposed into channel sums and a per-channel scale/shift (``schedules.group_norm``).

Built with slimc's pipeline and compared with PyTorch: one group (PoolFormer), several groups,
a map with no conv around it (NCHW) and a map too small to rewrite; the
kernels are checked for what replaced TVM's one-row ``group_norm`` kernel, and the one-group
case is rebuilt for aarch64 and run under qemu (the rewrite runs for every target).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_schedules import _build_run, _lower


class ConvNorm(torch.nn.Module):
    """A 1x1 conv, a group norm, a 1x1 conv: the norm runs on the convs' NHWC map."""

    def __init__(self, channels: int, groups: int, affine: bool = True) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 1)
        self.norm = torch.nn.GroupNorm(groups, channels, affine=affine)
        if affine:
            torch.nn.init.uniform_(self.norm.weight, 0.5, 1.5)
            torch.nn.init.uniform_(self.norm.bias, -0.5, 0.5)
        self.proj = torch.nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(self.conv(x)))


def _kernels(applied: list[str]) -> list[str]:
    return [line.split()[-1] for line in applied]


def _compare(module, x, tmp_path, caplog, **kw) -> list[str]:
    got, applied = _build_run(module, (x,), tmp_path, caplog=caplog, **kw)
    with torch.no_grad():
        want = module(x).numpy()
    err = np.linalg.norm(got[0] - want) / np.linalg.norm(want)
    assert err < 1e-5, f"relative L2 error {err:.3g}"
    return _kernels(applied)


@pytest.mark.parametrize("channels,groups,size,affine", [
    (64, 1, 56, True),    # PoolFormer-S12's first stage
    (96, 4, 20, True),    # groups of 24 channels
    (32, 8, 24, True),    # groups of 4 channels
])
def test_group_norm_matches_pytorch_without_the_row_kernel(channels, groups, size, affine,
                                                           tmp_path, caplog):
    torch.manual_seed(0)
    module = ConvNorm(channels, groups, affine).eval()
    x = torch.randn(1, channels, size, size) * 2 + 0.5
    kernels = _compare(module, x, tmp_path, caplog)
    assert not any(k.startswith("group_norm") for k in kernels), kernels
    # the statistics: a sum and a sum of squares over the map, per channel
    assert any(k.startswith("sum") for k in kernels), kernels
    assert any("multiply" in k and "sum" in k for k in kernels), kernels


def test_group_norm_of_a_plain_nchw_input(tmp_path, caplog):
    """No conv: the norm stays on the NCHW input, channel axis 1."""
    torch.manual_seed(1)
    module = torch.nn.GroupNorm(2, 8).eval()
    x = torch.randn(2, 8, 40, 30) + 3.0  # a large mean: the E[x^2] - E[x]^2 variance
    kernels = _compare(module, x, tmp_path, caplog)
    assert not any(k.startswith("group_norm") for k in kernels), kernels


def test_tiny_group_norm_keeps_tvms_kernel():
    import tvm
    from slimc.backends.tvm.schedules.group_norm import MIN_ELEMENTS, decompose_group_norm
    from tvm import relax

    def ops(mod) -> set[str]:
        names: set[str] = set()
        relax.analysis.post_order_visit(
            mod["main"], lambda e: names.add(e.op.name) if isinstance(e, relax.Call)
            and isinstance(e.op, tvm.ir.Op) else None)
        return names

    small = _lower(torch.nn.GroupNorm(1, 4).eval(), (torch.randn(1, 4, 4, 4),))
    assert 4 * 4 * 4 < MIN_ELEMENTS
    assert "relax.nn.group_norm" in ops(decompose_group_norm(small))
    large = _lower(torch.nn.GroupNorm(1, 16).eval(), (torch.randn(1, 16, 32, 32),))
    rewritten = ops(decompose_group_norm(large))
    assert "relax.nn.group_norm" not in rewritten and "relax.sum" in rewritten
    # channels-first with many groups (wav2vec2's feature extractor): TVM's row kernel stays
    many = _lower(torch.nn.GroupNorm(64, 64).eval(), (torch.randn(1, 64, 400),))
    assert "relax.nn.group_norm" in ops(decompose_group_norm(many))
    # no group norm at all (ResNet, ConvNeXt): the very module comes back
    plain = _lower(torch.nn.Conv2d(3, 8, 3).eval(), (torch.randn(1, 3, 24, 24),))
    assert decompose_group_norm(plain).same_as(plain)


def test_group_norm_on_aarch64_under_qemu(tmp_path, aarch64_emulator):
    torch.manual_seed(2)
    module = ConvNorm(32, 1).eval()
    x = torch.randn(1, 32, 16, 16) * 2 + 0.5
    got, _ = _build_run(module, (x,), tmp_path, target="arm", cross="aarch64-linux-gnu")
    with torch.no_grad():
        want = module(x).numpy()
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)
