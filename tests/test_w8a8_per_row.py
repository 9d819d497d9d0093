"""W8A8 with per-row (per-token) activation scales found at run time (``act_scales``).

One static scale serves every token; in small LLMs token ranges differ by orders of magnitude,
and SmolLM2-135M's W8A8 lost 6.2% perplexity that way (1.5% with per-row scales, at the same
prefill time: docs/benchmarks.md, session 29). The kernel that writes the codes finds each
row's maximum (``row_quantize_kernel``) and the int8 matmul multiplies each output row by its
scale. Real TVM builds (x86 and, under qemu, aarch64's sdot), real HF Llama class.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from slimc.backends.tvm.quantized_ops import row_quantize_kernel
from slimc.passes.quantize.activations import dynamic_int8, static_int8

import slimc
from slimc.dialect import quantize_activation, quantize_rows


@pytest.mark.parametrize("m, k, dtype, offset", [
    (7, 576, "uint8", 128),  # VNNI: codes + 128 as uint8
    (5, 70, "int8", 0),  # sdot / generic; k not a multiple of the 16 lanes
    (None, 37, "int16", 0),  # AVX2's int16 codes, a symbolic row count
])
def test_row_quantize_kernel_equals_the_reference(m, k, dtype, offset):
    """Codes and scales bit for bit as ``slimc.dialect.quantize_rows`` (the IR's op) makes
    them, an all-zero row included (scale ROW_TINY / 127, codes 0)."""
    import tvm

    lib = tvm.tirx.build(row_quantize_kernel(m, k, dtype, offset), target={"kind": "llvm"})
    rows = m or 9
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-2, 2, k)
    x[2] = 0.0
    mult = torch.rand(k, generator=g) + 0.5
    want_codes, want_scales = quantize_rows(x, mult)
    codes = tvm.runtime.tensor(np.zeros((rows, k), dtype))
    scales = tvm.runtime.tensor(np.zeros(rows, np.float32))
    lib(tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(mult.numpy()), codes, scales)
    np.testing.assert_array_equal(codes.numpy().astype(np.int32) - offset,
                                  want_codes.numpy().astype(np.int32))
    np.testing.assert_array_equal(scales.numpy(), want_scales.reshape(-1).numpy())


def test_per_row_scales_follow_each_token():
    """Rows whose magnitudes span 1e-2..1e2: one calibrated scale resolves the loud rows and
    rounds the quiet ones to nothing; per-row scales keep every row's relative error small."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 96, generator=g)
    rows = torch.randn(256, 96, generator=g) * torch.logspace(-2, 2, 256)[:, None]
    abs_max = rows.abs().amax(0)
    static = static_int8(weight, abs_max, rows)
    dynamic = dynamic_int8(weight, abs_max, rows)
    assert dynamic.per_row and not static.per_row
    assert dynamic.error < static.error  # the mean error, made of the loud rows

    def worst_row(out: torch.Tensor) -> float:
        ref = rows @ weight.t()
        return float(((out - ref).norm(dim=1) / ref.norm(dim=1)).max())

    codes = quantize_activation(rows, static.in_mult, static.zero_point) - static.zero_point
    static_out = (codes @ static.weight.float().t()) * static.out_scale
    x_codes, row_scale = quantize_rows(rows, dynamic.in_mult)
    dynamic_out = (x_codes @ dynamic.weight.float().t()) * dynamic.out_scale * row_scale
    assert worst_row(static_out) > 0.5  # the quietest rows: codes of a few steps at most
    assert worst_row(dynamic_out) < 0.05


def _per_layer(result) -> dict:
    quantize = next(p for p in result.manifest["pipeline"] if p["pass"] == "quantize")
    return quantize["summary"]["per_layer"]


@pytest.mark.parametrize("target", ["llvm", "arm-v8.2"])
def test_dynamic_scales_on_a_dynamic_sequence(hf_dir, tmp_path, dynamic_default, target,
                                              request):
    """``act_scales=dynamic`` on a Llama built for any sequence length: every linear takes
    per-row scales (their kernels read the padded rows' scales too), the library matches the
    IR at each checked length; sdot under qemu-aarch64."""
    if target != "llvm":
        request.getfixturevalue("aarch64_emulator")
    result = slimc.compile_model(hf_dir("llama"), slimc.CompileOptions(
        pipeline="quantize{weights=int8,activations=int8,act_scales=dynamic}",
        output=tmp_path / "out", target=target, threads=2, cache=False,
        emulate="require" if target != "llvm" else "auto"))
    v = result.manifest["verification"]
    assert v["passed"] and all(s["passed"] for s in v["shapes"])
    w8a8 = [e for e in _per_layer(result).values() if e.get("activations") == "int8"]
    assert w8a8 and all(e["act_scales"] == "dynamic" for e in w8a8)
    symbols = (result.output / "model.so").read_bytes()
    assert b"slimc_row_quantize_dyn" in symbols and b"_rs" in symbols


def test_static_scales_on_request(hf_dir, tmp_path):
    result = slimc.compile_model(hf_dir("llama"), slimc.CompileOptions(
        pipeline="quantize{weights=int8,activations=int8,act_scales=static}",
        output=tmp_path / "out", threads=2, cache=False))
    assert result.manifest["verification"]["passed"]
    w8a8 = [e for e in _per_layer(result).values() if e.get("activations") == "int8"]
    assert w8a8 and all(e["act_scales"] == "static" for e in w8a8)
    assert b"slimc_row_quantize" not in (result.output / "model.so").read_bytes()


def test_act_scales_without_int8_activations_is_refused(cli, tmp_path):
    """A user who asks for per-token scales without int8 activations would get a weight-only
    artifact and think it has them: a usage error (exit 2) instead."""
    result = cli("compile", "tests.test_w8a8:awkward_mlp", "--pipeline",
                 "quantize{weights=int8,act_scales=dynamic}", "-o", str(tmp_path / "out"))
    assert result.code == 2
    assert "does nothing without them" in result.err
    assert not (tmp_path / "out").exists()
