"""int4 with a float zero point (``quantize{weights=int4,zero_point=float}``): GGUF Q4_1's grid.

Q4_1 stores, per block of 32 weights, a scale ``d`` and a minimum ``m`` (``w = d * q + m``).
slimc's default asymmetric int4 has an integer zero point (the grid holds 0.0), so it cannot
hold a Q4_1 block; with ``zero_point=float`` and ``group_size=32`` a model dequantized from a
Q4_1 GGUF is re-quantized without any change to its weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from slimc.passes.quantize.formats import (
    Format,
    dequantize_int4,
    fake_quantize,
    int4_codes,
    int4_params,
    pack_int4,
    parse_format,
)


def _q4_1_weights(n: int = 48, k: int = 256, seed: int = 0) -> torch.Tensor:
    """Weights on a Q4_1 grid: per 32 inputs an fp16 scale and minimum, codes 0..15."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(n, k // 32, 1, generator=g) * 0.1).half().float()
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15  # llama.cpp's quantizer maps each block's min/max there
    return (d * q + m).reshape(n, k)


def test_float_zero_point_holds_q4_1_weights_exactly():
    w = _q4_1_weights()
    exact = fake_quantize(w, Format("int4", 32, float_zero=True))
    assert torch.allclose(exact, w, rtol=0, atol=1e-6 * w.abs().max())
    integer = fake_quantize(w, Format("int4", 32))
    assert (integer - w).abs().max() > 100 * (exact - w).abs().max()
    fmt = parse_format("int4-g32-fz")
    assert fmt.float_zero and str(fmt) == "int4-g32-fz"
    assert fmt.bits_per_weight(256) == pytest.approx(4 + 32 / 32)  # fp16 scale + minimum


@pytest.mark.parametrize("m,k,n,group", [(1, 256, 64, 32), (3, 96, 24, 32), (16, 96, 32, 32),
                                         (6, 64, 16, 32)])
def test_float_zero_kernel_matches_the_reference(m, k, n, group):
    import tvm
    from slimc.backends.tvm import quantized_ops as q

    torch.manual_seed(0)
    w = torch.randn(n, k) + 0.5  # groups far from symmetric around 0
    params = int4_params(w, group, False, float_zero=True)
    assert params.zero.dtype == params.scale.dtype == torch.float16
    packed = pack_int4(int4_codes(w, params))
    x = torch.randn(m, k)
    expected = x @ dequantize_int4(packed, params.scale, params.zero, group, k).t()
    t = q.tile_for(n, "int4")

    def tiles(a):
        return a.reshape(n // t, t, -1).permute(0, 2, 1).contiguous().numpy()

    func = q.linear_kernel("int4", m, k, n, group, zero_dtype="float16")
    lib = tvm.compile(tvm.IRModule({"main": func}), target={"kind": "llvm"})
    args = [tvm.runtime.tensor(a) for a in (x.numpy(), tiles(packed), tiles(params.scale),
                                            tiles(params.zero), np.zeros((m, n), "float32"))]
    lib["main"](*args)
    np.testing.assert_allclose(args[-1].numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_symmetric_with_float_zero_is_a_usage_error(hf_dir, cli, tmp_path):
    result = cli("compile", hf_dir("llama"), "--pipeline",
                 "quantize{weights=int4,symmetric=true,zero_point=float}", "-o", tmp_path / "o")
    assert result.code == 2 and "zero_point" in result.err


def test_gptq_keeps_q4_1_weights_exactly_in_fp16_parameters():
    """GPTQ on weights already on a Q4_1 grid: no rounding error to feed back, so the codes
    and the fp16 scale / minimum reproduce the weights (the grid is fitted per group as the
    columns are reached, from the fp16 minimum as stored)."""
    from slimc.passes.quantize.gptq import gptq

    w = _q4_1_weights(n=16, k=128, seed=1)
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(2))
    codes, params = gptq(w, x.t() @ x, Format("int4", 32, float_zero=True))
    assert params.scale.dtype == params.zero.dtype == torch.float16
    got = dequantize_int4(pack_int4(codes), params.scale, params.zero, 32, 128)
    assert torch.allclose(got, w, rtol=0, atol=1e-6 * w.abs().max())


def test_float_zero_embedding_kernel_matches_the_reference():
    """The int4 embedding gather on the fp16 scale / minimum layout (an LM's tied table)."""
    import tvm
    from slimc.backends.tvm import quantized_ops as q

    vocab, dim, group = 40, 96, 32
    w = _q4_1_weights(n=vocab, k=dim, seed=3)
    params = int4_params(w, group, False, float_zero=True)
    packed = pack_int4(int4_codes(w, params))
    ids = np.array([0, 39, 7, 7, 12], dtype="int64")
    func = q.embedding_kernel("int4", len(ids), vocab, dim, group, zero_dtype="float16")
    lib = tvm.compile(tvm.IRModule({"main": func}), target={"kind": "llvm"})
    args = [tvm.runtime.tensor(a) for a in (ids, packed.numpy(), params.scale.numpy(),
                                            params.zero.numpy(), np.zeros((5, dim), "float32"))]
    lib["main"](*args)
    np.testing.assert_allclose(args[-1].numpy(), w[torch.from_numpy(ids)].numpy(),
                               rtol=0, atol=1e-6 * float(w.abs().max()))


def test_float_zero_grid_is_searched_off_the_q4_1_grid():
    """Off a Q4_1 grid (a g64 grid over g32 blocks, or plain float weights) the fp16 scale and
    minimum come from the int3/int2 grid search (shrunk ranges, least-squares refits), which
    keeps the plain [min, max] grid as one candidate: lower error, and Q4_1 weights at g32 stay
    exact (the test above)."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    searched = fake_quantize(w, parse_format("int4-g64-fz"))
    g = w.reshape(64, 4, 64)
    lo = g.amin(2).half().float()[..., None]
    step = ((g.amax(2)[..., None] - lo) / 15).half().float()
    plain = (torch.round((g - lo) / step).clamp(0, 15) * step + lo).reshape(64, 256)
    assert ((searched - w) ** 2).sum() < 0.9 * ((plain - w) ** 2).sum()
    regridded = fake_quantize(_q4_1_weights(), parse_format("int4-g64-fz"))
    assert (regridded - _q4_1_weights()).abs().max() > 0  # g64 cannot hold g32 blocks


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_embedding_lookups_are_float32_in_fake_mode_too(scale_dtype):
    """torch.export re-traces quantized graphs with the ops' fake kernels: a fake that said
    float16 for fp16 scales (the Q4_1 layout) broke the graph's own dtype check after the
    lookup (an RMSNorm's `.to(float32)`), and the 320M decoder's -O2 compile exited 1."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import slimc.dialect  # noqa: F401 - registers the ops

    torch.manual_seed(0)
    packed = torch.randint(0, 255, (10, 4), dtype=torch.uint8)
    scale, zero = torch.rand(10, 1).to(scale_dtype), torch.rand(10, 1).to(scale_dtype)
    qweight = torch.randint(-127, 127, (10, 8), dtype=torch.int8)
    ids = torch.tensor([[1, 2, 9]])
    calls = [(torch.ops.slimc.embedding_int4, (packed, scale, zero, ids, 8)),
             (torch.ops.slimc.embedding_int8, (qweight, scale.reshape(-1), ids))]
    for op, args in calls:
        eager = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        assert eager.dtype == fake.dtype == torch.float32
        assert tuple(fake.shape) == tuple(eager.shape) == (1, 3, 8)


@pytest.mark.parametrize("float_zero", [False, True])
def test_large_weights_dequantize_by_row_blocks_to_the_same_values(monkeypatch, float_zero):
    """A weight above DEQUANTIZE_CHUNK elements is dequantized a block of rows at a time
    (issue 18: five weight-sized temporaries of SmolLM2's tied table were the int4 compile's
    peak): the same float32 values as the whole round trip, odd widths and a partial last
    block included; int8 in place gives the same values too."""
    import slimc.dialect as dialect

    torch.manual_seed(0)
    weight = torch.randn(37, 70)
    params = int4_params(weight, 32, False, float_zero=float_zero)
    packed = pack_int4(int4_codes(weight, params))
    whole = dialect.dequantize_int4(packed, params.scale, params.zero, 32, 70)
    import slimc.passes.quantize.formats as formats

    monkeypatch.setattr(formats, "CODES_CHUNK", 5 * 70)  # rounding by row blocks too
    assert torch.equal(pack_int4(int4_codes(weight, params)), packed)
    monkeypatch.setattr(dialect, "DEQUANTIZE_CHUNK", 5 * 70)  # blocks of 5 rows: 7 + 1 left
    blocks = dialect.dequantize_int4(packed, params.scale, params.zero, 32, 70)
    assert blocks.dtype == whole.dtype == torch.float32
    assert torch.equal(blocks, whole)
    codes = torch.randint(-127, 128, (9, 13), dtype=torch.int8)
    scale = torch.rand(9)
    assert torch.equal(dialect.dequantize_int8(codes, scale), codes.float() * scale[:, None])


def test_int8_dequantize_never_scales_its_input_in_place():
    """``dequantize_int8`` scales a copy in place to save a weight-sized temporary; a weight
    that is float32 already (``.float()`` would return it as is) must come back unchanged."""
    import slimc.dialect as dialect

    weight = torch.randn(6, 5)
    before = weight.clone()
    scale = torch.rand(6) + 0.5
    out = dialect.dequantize_int8(weight, scale)
    assert torch.equal(weight, before)
    assert torch.allclose(out, before * scale[:, None])


@pytest.mark.parametrize("name", ["int4-g128", "int4-g32", "int4-g32-sym", "int4-g32-fz",
                                  "int4-g64-fz", "int4-g128-fz"])
def test_fake_quantize_is_the_packed_round_trip_bit_for_bit(name):
    """``fake_quantize`` computes an int4 round trip on the grouped view (issue 18: the
    gathered scales, codes and packing were ~15% of the 320M decoder's -O2 search); the
    values must be the packed artifact's, bit for bit: what the damage table prices is what
    the quantize pass stores. A partial last group, a zero row and a constant row included;
    ``fake_quantize_rows`` in row blocks gives the same."""
    from slimc.passes.quantize.formats import fake_quantize_rows

    torch.manual_seed(0)
    w = torch.randn(150, 200) * 0.02
    w[0] = 0.0
    w[1] = 0.3
    fmt = parse_format(name)
    params = int4_params(w, fmt.group_size, fmt.symmetric, fmt.float_zero)
    packed = dequantize_int4(pack_int4(int4_codes(w, params)), params.scale, params.zero,
                             fmt.group_size, w.shape[1])
    assert torch.equal(fake_quantize(w, fmt), packed)
    assert torch.equal(fake_quantize_rows(w, fmt, rows=64), packed)


@pytest.mark.parametrize("name", ["int4-g32", "int4-g64-fz", "int4-g32-sym"])
@pytest.mark.parametrize("shape", [(40, 128), (40, 100), (9000, 64)])
def test_dequantize_int4_in_whole_groups_is_the_gathered_formula(name, shape):
    """``dequantize_int4`` scales whole groups in place (no per-element scale / zero copies;
    issue 18) where the row is whole groups, block by block for a large weight: the values of
    the gathered formula ``int4_grid_values`` bit for bit, a partial last group (K = 100)
    through the gathered path."""
    from slimc.dialect import int4_grid_values, unpack_int4

    torch.manual_seed(1)
    w = torch.randn(*shape) * 0.05
    fmt = parse_format(name)
    params = int4_params(w, fmt.group_size, fmt.symmetric, fmt.float_zero)
    packed = pack_int4(int4_codes(w, params))
    k = shape[1]
    gathered = int4_grid_values(unpack_int4(packed, k).float(), params.scale, params.zero,
                                torch.arange(k) // fmt.group_size)
    assert torch.equal(dequantize_int4(packed, params.scale, params.zero, fmt.group_size, k),
                       gathered)
