"""The int8 weight kernel converts each weight once per block of rows (``row_block``): every
row count (blocks of 4, of 2, none, symbolic) and tile width gives PyTorch's result, on the
host and, built for aarch64, under qemu."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from slimc.backends.tvm import quantized_ops as q


def _int8_case(m: int, k: int, n: int):
    torch.manual_seed(m * 1000 + n)
    w = torch.randn(n, k)
    scale = w.abs().amax(dim=1) / 127
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    x = torch.randn(m, k)
    expected = x @ (codes.float() * scale[:, None]).t()
    t = q.tile_for(n, "int8")
    tiles = codes.reshape(n // t, t, k).permute(0, 2, 1).contiguous().numpy()
    return [x.numpy(), tiles, scale.numpy(), np.zeros((m, n), "float32")], expected.numpy()


@pytest.mark.parametrize("m,k,n,blocked", [(8, 96, 128, 4), (6, 40, 24, 2), (3, 64, 64, 1),
                                           (1, 576, 192, 1), (12, 33, 5, 4)])
def test_int8_kernel_matches_the_reference(m, k, n, blocked):
    import tvm

    assert q.row_block(m) == blocked
    func = q.linear_kernel("int8", m, k, n)
    lib = tvm.compile(tvm.IRModule({"main": func}), target={"kind": "llvm"})
    arrays, expected = _int8_case(m, k, n)
    args = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*args)
    np.testing.assert_allclose(args[-1].numpy(), expected, rtol=1e-4, atol=1e-4)


def test_symbolic_rows_use_the_per_row_kernel():
    import tvm

    assert q.row_block(None) == 1
    func = q.linear_kernel("int8", None, 64, 32)
    lib = tvm.compile(tvm.IRModule({"main": func}), target={"kind": "llvm"})
    for m in (1, 5):
        arrays, expected = _int8_case(m, 64, 32)
        args = [tvm.runtime.tensor(a) for a in arrays]
        lib["main"](*args)
        np.testing.assert_allclose(args[-1].numpy(), expected, rtol=1e-4, atol=1e-4)


def test_blocked_int8_artifact_is_verified_under_qemu(tmp_path, aarch64_emulator):
    """An int8 model whose linears get row blocks, built for aarch64 and run under qemu."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 48)).eval()
    import slimc

    result = slimc.compile(model, (torch.randn(8, 64),), target="arm", emulate="require",
                           pipeline="quantize{weights=int8}", output=tmp_path / "out")
    v = result.manifest["verification"]
    assert v["passed"] and v["ran_on"].startswith("qemu") and v["relative_l2_vs_ir"] < 1e-5
