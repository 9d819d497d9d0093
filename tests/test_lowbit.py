"""int3 / int2 weights (``quantize{weights=int3|int2}``, ``int3-g64`` in ``layers=`` and in the
budget search): bit packing, the grid, GPTQ, the kernels on awkward shapes (host and, under
qemu, aarch64), and real artifacts whose stored weights really shrink."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from slimc.passes.quantize.formats import Format, fake_quantize, parse_format
from slimc.passes.quantize.gptq import gptq
from slimc.passes.quantize.rtn import pack

import slimc
from slimc.lowbit import (
    dequantize_lowbit,
    grid,
    pack_bits,
    pack_lowbit,
    unpack_bits,
)


def _compile(model: str, pipeline: str, out, **kw):
    return slimc.compile_model(model, slimc.CompileOptions(
        pipeline=pipeline, output=out, threads=2, **kw))


@pytest.mark.parametrize("bits", [3, 2])
def test_bit_packing_round_trips_and_really_packs(bits):
    codes = torch.randint(0, 1 << bits, (5, 64), generator=torch.Generator().manual_seed(0))
    packed = pack_bits(codes.to(torch.uint8), bits)
    assert packed.shape == (5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, bits), codes.to(torch.uint8))
    # code k sits in bits [k*B, k*B+B) of the row's little-endian stream
    stream = int.from_bytes(bytes(packed[2].tolist()), "little")
    assert [(stream >> (bits * k)) & ((1 << bits) - 1) for k in range(64)] == codes[2].tolist()


def test_formats_parse_and_count_their_overhead():
    fmt = parse_format("int3-g64")
    assert fmt == Format("int3", 64) and str(fmt) == "int3-g64" and fmt.lowbit
    assert fmt.bits_per_weight(128) == pytest.approx(3 + 32 / 64)
    # a partial last group is padded to a whole group of codes
    assert parse_format("int2-g32").bits_per_weight(40) == pytest.approx((2 * 64 + 2 * 32) / 40)
    for bad in ("int3-g12", "int2-gx", "int3-g4"):
        with pytest.raises(ValueError):
            parse_format(bad)


@pytest.mark.parametrize("bits", [3, 2])
def test_grid_beats_min_max_and_gptq_beats_rtn(bits):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 96, generator=g)
    w[:, 5] *= 8  # outliers: min/max wastes most of the range
    scale, minimum = grid(w, bits, 32)
    assert scale.dtype == torch.float32 and torch.equal(scale, scale.half().float())
    rebuilt = fake_quantize(w, Format(f"int{bits}", 32))
    grouped = w.reshape(32, 3, 32)
    lo, hi = grouped.amin(2, keepdim=True), grouped.amax(2, keepdim=True)
    step = (hi - lo) / ((1 << bits) - 1)
    minmax = (torch.round((grouped - lo) / step) * step + lo).reshape(32, 96)
    assert (rebuilt - w).norm() < (minmax - w).norm()
    x = torch.randn(256, 96, generator=g) @ torch.randn(96, 96, generator=g)
    fmt = Format(f"int{bits}", 32)
    codes, params = gptq(w, 2 * x.T @ x, fmt)
    t = pack(w, fmt, params=params, codes=codes)
    q = dequantize_lowbit(t["weight"], t["scale"], t["minimum"], bits, 32, 96)
    assert (x @ (q - w).T).norm() < (x @ (rebuilt - w).T).norm()


# m rows, k inputs (not a multiple of the group: padded), n outputs (odd tiles), bits, group
SHAPES = [(1, 96, 24, 3, 32), (3, 100, 6, 2, 32), (8, 72, 48, 3, 64), (5, 136, 16, 2, 128)]


def _reference(m, k, n, bits, group):
    torch.manual_seed(0)
    w = torch.randn(n, k) + 0.3
    t = pack_lowbit(w, bits, group)
    x = torch.randn(m, k)
    return w, t, x, x @ dequantize_lowbit(t["weight"], t["scale"], t["minimum"], bits, group,
                                          k).t()


@pytest.mark.parametrize("m,k,n,bits,group", SHAPES)
def test_kernels_match_the_reference(m, k, n, bits, group):
    import tvm
    from slimc.backends.tvm import lowbit_ops, quantized_ops

    w, t, x, expected = _reference(m, k, n, bits, group)
    tile = quantized_ops.tile_for(n, "int4")

    def tiles(a):
        return a.reshape(n // tile, tile, -1).permute(0, 2, 1).contiguous().numpy()

    func = lowbit_ops.lowbit_linear_kernel(m, k, n, bits, group, tile)
    lib = tvm.compile(tvm.IRModule({"main": func}), target={"kind": "llvm"})
    padded = torch.nn.functional.pad(x, (0, t["weight"].shape[1] * 8 // bits - k))
    args = [tvm.runtime.tensor(a) for a in (padded.numpy(), tiles(t["weight"]),
                                            tiles(t["scale"]), tiles(t["minimum"]),
                                            np.zeros((m, n), "float32"))]
    lib["main"](*args)
    np.testing.assert_allclose(args[-1].numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)

    ids = np.array([0, n - 1, 2, n + 7, -3], "int64")  # out-of-range ids read the nearest row
    func = lowbit_ops.lowbit_embedding_kernel(len(ids), n, k, bits, group)
    lib = tvm.compile(tvm.IRModule({"main": func}), target={"kind": "llvm"})
    out = tvm.runtime.tensor(np.zeros((len(ids), k), "float32"))
    lib["main"](tvm.runtime.tensor(ids), *(tvm.runtime.tensor(t[key].numpy())
                                           for key in ("weight", "scale", "minimum")), out)
    table = dequantize_lowbit(t["weight"], t["scale"], t["minimum"], bits, group, k).numpy()
    np.testing.assert_allclose(out.numpy(), table[np.clip(ids, 0, n - 1)], rtol=1e-6,
                               atol=1e-6)


def test_int3_artifact_is_smaller_than_int4_and_matches_its_ir(hf_dir, tmp_path):
    from slimc.passes.quantize.quantize import QuantizeOptions, quantize_ir

    from slimc.capture import capture, load_model
    from slimc.loaders.base import parse_overrides
    from slimc.passmanager import PassContext
    from slimc.plugins import get_registry

    ir, inputs = capture(load_model(hf_dir("llama"), parse_overrides([]), get_registry()))
    quantize_ir(ir, PassContext(example_inputs=inputs), QuantizeOptions(weights="int4",
                                                                       group_size=32))
    int3 = _compile(hf_dir("llama"), "quantize{weights=int3,group_size=32}", tmp_path / "b")
    m = int3.manifest
    assert m["verification"]["passed"] and m["verification"]["relative_l2_vs_ir"] < 1e-5
    # stored bytes really shrink: 4 bits per weight (codes + fp16 scale and minimum per 32)
    # vs int4-g32's 5.25
    assert m["weight_bytes_after"] < 0.85 * ir.weight_bytes()
    assert m["params_after"] == ir.num_params()  # bit-packed codes count as their weights


def test_artifact_constants_are_the_packed_codes(medium_llama_fp32):
    """What TVM keeps after constant folding: uint8 codes and fp16 scales, no fp32 weights."""
    from slimc.backends.tvm.lower import lower_to_relax
    from slimc.backends.tvm.quantized_ops import constant_bytes
    from slimc.passes.quantize.quantize import QuantizeOptions, quantize_ir

    from slimc.passmanager import PassContext
    from slimc.plugins import get_registry

    reg = get_registry()
    original, inputs, fp32 = medium_llama_fp32
    ir = original.clone()
    quantize_ir(ir, PassContext(example_inputs=inputs),
                QuantizeOptions(weights="int3", group_size=64))
    sizes = constant_bytes(lower_to_relax(ir, reg.converters))
    assert sum(sizes.values()) <= (3.5 / 32 + 0.01) * fp32
    assert sizes.get("float32", 0) < 0.01 * fp32 and sizes["uint8"] > 0.9 * 3 / 32 * fp32


def test_int2_tied_embedding_with_gptq(hf_dir, tmp_path):
    """gpt2 ties its output head to the embedding: one packed int2 table, gathered and
    multiplied; GPTQ rounds the linears from calibration text."""
    calib = tmp_path / "calib.txt"
    calib.write_text("In the beginning God created the heaven and the earth. " * 20)
    result = _compile(hf_dir("gpt2"), "quantize{weights=int2,group_size=32,method=gptq}",
                      tmp_path / "o", calib=str(calib))
    m = result.manifest
    assert m["verification"]["passed"] and m["verification"]["relative_l2_vs_ir"] < 1e-5
    assert m["weight_bytes_after"] < 0.25 * m["weight_bytes_before"]


def test_int3_artifact_runs_on_aarch64(hf_dir, tmp_path, aarch64_emulator):
    result = _compile(hf_dir("llama"), "quantize{weights=int3,group_size=32}", tmp_path / "o",
                      target="arm", emulate="require")
    assert result.manifest["verification"]["passed"]
    assert result.manifest["verification"]["ran_on"].startswith("qemu")


@pytest.mark.parametrize("option", ["weights=int3,group_size=12", "layers=*=int2-g20"])
def test_bad_lowbit_options_exit_2(cli, hf_dir, option):
    result = cli("compile", hf_dir("llama"), "--pipeline", f"quantize{{{option}}}")
    assert result.code == 2
    assert "group" in result.err or "int2-g20" in result.err


def test_gpu_target_refuses_lowbit_with_advice(cli, hf_dir, tmp_path):
    result = cli("compile", hf_dir("llama"), "--target", "cuda", "--pipeline",
                 "quantize{weights=int3,group_size=32}", "-o", tmp_path / "g")
    assert result.code == 2 and "CPU kernels only" in result.err
    assert "Traceback" not in result.err and not (tmp_path / "g").exists()


def test_grid_search_in_row_chunks_gives_the_whole_search(monkeypatch):
    """Each row's groups are searched independently, so the search runs a chunk of rows at a
    time (issue 18: the whole 49152 x 576 table's temporaries were ~0.5 GB) with the same
    grid bit for bit, a partial last group and a partial last chunk included."""
    from slimc import lowbit

    torch.manual_seed(0)
    w = torch.randn(300, 200)
    whole = lowbit._search_rows(w, 3, 64)
    monkeypatch.setattr(lowbit, "GRID_ROWS", 64)
    chunked = lowbit._search_grid(w, 3, 64)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked, strict=True))
    # chunks bounded by weights (the L2-sized blocks: 1.5-1.9x faster) rather than rows
    monkeypatch.setattr(lowbit, "GRID_ELEMENTS", 200 * 37)
    chunked = lowbit._search_grid(w, 3, 64)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked, strict=True))


def test_grid_search_stops_when_the_plain_grid_is_exact(monkeypatch):
    """Weights that sit on an fp16 Q4_1 grid (SmolLM2's, dequantized from GGUF) are exact on
    the plain [min, max] grid of their own group size: the search stops there (one pass, not
    27; a third of -O2's grid searches on SmolLM2, issue 18) with the grid that reproduces
    them; other weights are searched as before (the torch search; the fused kernels' early
    stop: tests/test_lowbit_fused.py)."""
    from slimc import lowbit

    torch.manual_seed(0)
    n, k, group = 256, 128, 32
    codes = torch.randint(0, 16, (n, k // group, group)).float()
    codes[..., 0], codes[..., 1] = 0.0, 15.0  # every group spans the grid
    step = (torch.rand(n, k // group) * 0.01 + 1e-3).half().float()
    low = (-torch.rand(n, k // group) * 0.05).half().float()
    weight = (codes * step[..., None] + low[..., None]).reshape(n, k)
    passes = []
    real = lowbit._half
    monkeypatch.setattr(lowbit, "_half", lambda t: passes.append(1) or real(t))
    scale, minimum = lowbit._search_rows_torch(weight, 4, group)
    assert len(passes) == 2  # scale and minimum of the first grid only
    back = lowbit._codes(lowbit._grouped(weight, group), scale, minimum, 15) \
        * scale[..., None] + minimum[..., None]
    assert torch.equal(back.reshape(n, k), weight)
    passes.clear()
    lowbit._search_rows_torch(weight + 1e-4 * torch.randn(n, k), 4, group)
    assert len(passes) == 2 * 27
