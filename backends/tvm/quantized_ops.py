"""slimc's quantized operators: PyTorch custom ops for the IR, Relax converters for TVM.

Why custom ops: after ``quantize`` the IR must stay executable (every transform is verified by
running it) *and* must carry the packed weights as they will be stored in the artifact. An
``aten`` dequantize followed by ``aten.linear`` would do the first, but TVM's ``FoldConstant``
folds ``dequantize(constant)`` back into an fp32 constant and the artifact would silently be
fp32 again. So the IR uses opaque ops (``slimc::linear_int8`` ...) whose operands are the
packed tensors, and each converter lowers one of them to an ``R.call_tir`` of a hand-scheduled
TIR kernel that unpacks and dequantizes *inside* the matmul (or gather) loop nest. The only
constant folding that can happen is the layout change of the packed weight (int8 stays int8).

Ops (``x``: ``[..., K]`` float32; ``act_scale``: optional ``[K]`` per-input-channel multiplier
that AWQ uses, applied to ``x`` before the matmul):

* ``linear_int8(x, qweight int8[N,K], scale f32[N], bias?, act_scale?)``
* ``linear_int4(x, packed uint8[N,K/2], scale f32[N,G], zero uint8[N,G], bias?, act_scale?,
  group_size)``; code ``k`` of row ``n`` is nibble ``k % 2`` (low first) of ``packed[n, k//2]``
  and dequantizes to ``(code - zero[n, k//g]) * scale[n, k//g]``.
* ``linear_w8a8(x, qweight int8[N,K], in_mult f32[K], out_scale f32[N], bias?,
  zero_point)``: int8 weights *and* activations. ``x`` is quantized statically, ``a =
  clamp(round(x * in_mult) + zero_point, -128, 127)`` (``in_mult`` folds the calibrated input
  scale and any SmoothQuant per-channel factor; ``zero_point`` is 0 for a symmetric range), the
  matmul runs in integers and ``y = ((a - zero_point) @ qweight.T) * out_scale + bias``.
  Lowered to the dot-product kernels of ``int8_kernels`` (VNNI, sdot, or a generic int8
  kernel), which take ``zero_point * sum_k qweight[n, k]`` back out in integers.
* ``linear_fp16(x, weight f16[N,K], bias?)`` / ``linear_bf16(x, weight bf16[N,K], bias?)``
* ``embedding_int8(qweight, scale, ids)`` / ``embedding_int4(packed, scale, zero, ids,
  group_size)``: gather rows, then dequantize (row = vocabulary entry, so a tied output head
  shares the same packed table).

Kernel layout: the converter reshapes the ``[N, ...]`` weight into ``[N/t, ..., t]`` tiles
(``t`` output features, the vector width), a pure relayout constant-folded at build time, so
the kernel streams each tile contiguously while computing ``t`` outputs in vector lanes. Each
kernel is scheduled here (parallel over tiles, vectorized over lanes, accumulator in
registers) and marked ``tirx.is_scheduled`` so generic schedule rules leave it alone.

int4 uses :func:`_int4_grouped_kernel` (``K`` not a multiple of the group size is zero-padded to
whole groups, x at run time and the codes at build time): scale and zero point
are factored out of the inner loop (applied once per group, with per-row group sums of ``x``),
and the inner loop unpacks both nibbles of a byte with constant shifts and widens them straight
into ``t``-lane fp32 multiply-adds. Single-threaded on the host it is ~10x faster than the
per-k dequantizing kernel on decode shapes (768x2048, g128: 0.07 vs 0.72 ms).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Reference (PyTorch) semantics, shared by the ops and by the quantization code
# ---------------------------------------------------------------------------------------------


def unpack_int4(packed: Tensor, k: int) -> Tensor:
    """``uint8[N, ceil(K/2)]`` -> codes ``uint8[N, K]`` (low nibble holds the even column)."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)[:, :k]


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int,
                    k: int) -> Tensor:
    """Float weight ``[N, K]`` from packed int4 codes and per-group scale / zero point."""
    codes = unpack_int4(packed, k).float()
    index = torch.arange(k) // group_size
    return (codes - zero.float()[:, index]) * scale[:, index]


def dequantize_int8(qweight: Tensor, scale: Tensor) -> Tensor:
    return qweight.float() * scale[:, None]


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, act_scale: Tensor | None) -> Tensor:
    if act_scale is not None:
        x = x * act_scale
    return F.linear(x, weight, bias)


# ---------------------------------------------------------------------------------------------
# torch.library custom ops (eager kernels + fake kernels for torch.export re-decomposition)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("slimc::linear_int8", mutates_args=())
def linear_int8(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None,
                act_scale: Tensor | None) -> Tensor:
    return _linear(x, dequantize_int8(qweight, scale), bias, act_scale)


@torch.library.custom_op("slimc::linear_int4", mutates_args=())
def linear_int4(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None,
                act_scale: Tensor | None, group_size: int) -> Tensor:
    weight = dequantize_int4(packed, scale, zero, group_size, x.shape[-1])
    return _linear(x, weight, bias, act_scale)


#: Relative perturbation applied to W8A8 inputs before rounding (see ``rounding_noise_floor``).
_JITTER: dict[str, Any] = {"relative": 0.0, "generator": None}


def quantize_activation(x: Tensor, in_mult: Tensor, zero_point: int = 0) -> Tensor:
    """Static int8 activation codes (as float): ``clamp(round(x * in_mult) + zp, -128, 127)``."""
    scaled = x * in_mult
    if _JITTER["relative"]:
        noise = torch.rand(scaled.shape, generator=_JITTER["generator"]) * 2.0 - 1.0
        scaled = scaled * (1.0 + _JITTER["relative"] * noise)
    return torch.clamp(torch.round(scaled) + zero_point, -128.0, 127.0)


#: Relative size of the float differences between PyTorch and a compiled kernel on the same
#: activation (a different summation order in a LayerNorm or matmul: up to ~16 ulps of fp32).
KERNEL_FLOAT_NOISE = 1e-6


def rounding_noise_floor(ir, inputs, reference=None, seeds: int = 2) -> float | None:
    """How far float noise alone moves the outputs of an IR with static int8 activations.

    Rounding to a fixed grid is discontinuous: a compiled artifact whose LayerNorm sums in a
    different order gets an activation a few ulps off, a few codes round the other way, and the
    change grows through the following layers (measured on all-MiniLM-L6-v2 with a correct
    artifact: relative L2 2e-7 after one W8A8 encoder layer, 3e-3 after two, 4e-2 after six).
    Comparing such an artifact with the IR at a fixed 1e-3 would reject correct builds, so the
    compiler compares it with this floor instead: the relative L2 between the IR's outputs and
    the IR's outputs with every W8A8 input perturbed by ``KERNEL_FLOAT_NOISE`` (relative,
    uniform), the largest over ``seeds`` perturbations. None (and nothing run) if the IR has
    no such op. ``reference``: the IR's unperturbed outputs (numpy), if the caller has them.
    """
    import numpy as np

    if not any(node.target is OPS["linear_w8a8"] for node in ir.nodes("call_function")):
        return None
    run = ir.run
    if reference is None:
        reference = [t.detach().numpy() for t in run(inputs)]
    worst = 0.0
    try:
        for seed in range(seeds):
            _JITTER.update(relative=KERNEL_FLOAT_NOISE,
                           generator=torch.Generator().manual_seed(seed))
            noisy = [t.detach().numpy() for t in run(inputs)]
            num = sum(float(np.sum((a - b) ** 2)) for a, b in zip(noisy, reference, strict=True))
            den = sum(float(np.sum(b ** 2)) for b in reference) or 1.0
            worst = max(worst, (num / den) ** 0.5)
    finally:
        _JITTER.update(relative=0.0, generator=None)
    return worst


@torch.library.custom_op("slimc::linear_w8a8", mutates_args=())
def linear_w8a8(x: Tensor, qweight: Tensor, in_mult: Tensor, out_scale: Tensor,
                bias: Tensor | None, zero_point: int) -> Tensor:
    # Integer-valued float32 matmul: exact while partial sums stay below 2**24, and within
    # float rounding of the artifact's int32 accumulation beyond that.
    codes = quantize_activation(x, in_mult, zero_point) - zero_point
    y = F.linear(codes, qweight.float()) * out_scale
    return y + bias if bias is not None else y


@torch.library.custom_op("slimc::linear_fp16", mutates_args=())
def linear_fp16(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight.float(), bias)


@torch.library.custom_op("slimc::linear_bf16", mutates_args=())
def linear_bf16(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight.float(), bias)


@torch.library.custom_op("slimc::embedding_int8", mutates_args=())
def embedding_int8(qweight: Tensor, scale: Tensor, ids: Tensor) -> Tensor:
    return qweight[ids].float() * scale[ids][..., None]


def embedding_int4_dim(packed_width: int, groups: int, group_size: int) -> int:
    """Row width of a packed int4 table: ``2 * packed_width`` unless the groups end earlier
    (the last group may be partial, e.g. 576 = 4.5 groups of 128; ``quantize_ir`` stores odd
    widths as int8, so the width is even)."""
    return min(2 * packed_width, groups * group_size)


@torch.library.custom_op("slimc::embedding_int4", mutates_args=())
def embedding_int4(packed: Tensor, scale: Tensor, zero: Tensor, ids: Tensor,
                   group_size: int) -> Tensor:
    dim = embedding_int4_dim(packed.shape[1], scale.shape[1], group_size)
    flat = ids.reshape(-1)
    rows = dequantize_int4(packed[flat], scale[flat], zero[flat], group_size, dim)
    return rows.reshape(*ids.shape, dim)


def _fake_linear(x: Tensor, weight_rows: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight_rows))


@linear_int8.register_fake
def _(x, qweight, scale, bias, act_scale):
    return _fake_linear(x, qweight.shape[0])


@linear_int4.register_fake
def _(x, packed, scale, zero, bias, act_scale, group_size):
    return _fake_linear(x, packed.shape[0])


@linear_w8a8.register_fake
def _(x, qweight, in_mult, out_scale, bias, zero_point):
    return _fake_linear(x, qweight.shape[0])


@linear_fp16.register_fake
def _(x, weight, bias):
    return _fake_linear(x, weight.shape[0])


@linear_bf16.register_fake
def _(x, weight, bias):
    return _fake_linear(x, weight.shape[0])


@embedding_int8.register_fake
def _(qweight, scale, ids):
    return scale.new_empty((*ids.shape, qweight.shape[1]))


@embedding_int4.register_fake
def _(packed, scale, zero, ids, group_size):
    dim = embedding_int4_dim(packed.shape[1], scale.shape[1], group_size)
    return scale.new_empty((*ids.shape, dim))


OPS = {
    "linear_int8": torch.ops.slimc.linear_int8.default,
    "linear_int4": torch.ops.slimc.linear_int4.default,
    "linear_w8a8": torch.ops.slimc.linear_w8a8.default,
    "linear_fp16": torch.ops.slimc.linear_fp16.default,
    "linear_bf16": torch.ops.slimc.linear_bf16.default,
    "embedding_int8": torch.ops.slimc.embedding_int8.default,
    "embedding_int4": torch.ops.slimc.embedding_int4.default,
}

# ---------------------------------------------------------------------------------------------
# TIR kernels
# ---------------------------------------------------------------------------------------------

#: Output features per tile (vector lanes of fp32 accumulators); smaller when N is not a
#: multiple of it.
TILE_CHOICES = (16, 8, 4, 2, 1)


#: Use :func:`_int4_grouped_kernel` where it applies (False: the per-k dequantizing kernel,
#: kept for comparison and for ``K`` that is not a multiple of the group size).
FACTORED_INT4 = True
#: Unroll factor of the factored int4 kernel's byte loop.
INT4_UNROLL = 4


#: Output lanes of a wide panel: four AVX-512 vectors, four independent multiply-add chains per
#: input element (one 16-lane chain is bound by the FMA latency on cache-resident weights).
#: Measured per-matrix on the host (1 row, interleaved): int8 576x1536 0.067 -> 0.043 ms,
#: 1536x576 0.033 -> 0.023 ms; int4's factored kernel did not gain, so it keeps 16.
WIDE_TILE = 64


def tile_for(n: int, kind: str = "") -> int:
    """Output features per packed weight tile (``kind``: the kernel's weight format)."""
    if kind in ("int8", "fp16", "bf16", "fp32") and n % WIDE_TILE == 0:
        return WIDE_TILE
    return next(t for t in TILE_CHOICES if n % t == 0)


def _pads_to_groups(k: int, group: int) -> bool:
    """Whether an int4 linear is lowered with x and codes zero-padded to whole groups."""
    return FACTORED_INT4 and group % 2 == 0 and k % 2 == 0 and k % group != 0


@functools.lru_cache(maxsize=256)
def linear_kernel(kind: str, m: int, k: int, n: int, group: int = 0, tile: int = 0):
    """A scheduled PrimFunc ``(x[m,k], weight tiles..., y[m,n])`` with dequant in the loop.

    int4 with a partial last group takes ``x[m, K']``, ``K'`` = ``k`` rounded up to whole
    groups (the converter pads x and the packed codes with zeros).
    """
    from tvm import te, tirx

    t = tile or tile_for(n, kind)
    if kind == "int4" and _pads_to_groups(k, group):
        k = -(-k // group) * group
    if kind == "int4" and FACTORED_INT4 and group % 2 == 0 and k % group == 0:
        return _int4_grouped_kernel(m, k, n, group, t)
    x = te.placeholder((m, k), "float32", name="x")
    r = te.reduce_axis((0, k), name="k")
    if kind == "int8":
        w = te.placeholder((n // t, k, t), "int8", name="w")
        s = te.placeholder((n,), "float32", name="scale")
        params = [x, w, s]

        def deq(j, kk):
            return w[j // t, kk, j % t].astype("float32") * s[j]
    elif kind == "int4":
        groups = -(-k // group)
        w = te.placeholder((n // t, (k + 1) // 2, t), "uint8", name="w")
        s = te.placeholder((n // t, groups, t), "float32", name="scale")
        z = te.placeholder((n // t, groups, t), "uint8", name="zero")
        params = [x, w, s, z]

        def deq(j, kk):
            byte = w[j // t, kk // 2, j % t]
            code = (byte >> ((kk % 2) * 4).astype("uint8")) & tirx.const(15, "uint8")
            g = kk // group
            return ((code.astype("float32") - z[j // t, g, j % t].astype("float32"))
                    * s[j // t, g, j % t])
    elif kind in ("fp16", "bf16", "fp32"):
        dtype = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[kind]
        w = te.placeholder((n // t, k, t), dtype, name="w")
        params = [x, w]

        def deq(j, kk):
            return w[j // t, kk, j % t].astype("float32")
    else:
        raise ValueError(kind)
    y = te.compute((m, n), lambda i, j: te.sum(x[i, r] * deq(j, r), axis=r), name="y")
    func = te.create_prim_func([*params, y])
    name = f"slimc_linear_{kind}_{m}x{k}x{n}" + (f"_g{group}" if group else "") \
        + (f"_t{t}" if tile else "")
    return _finish(_schedule_linear(func, t), name)


def _int4_grouped_kernel(m: int, k: int, n: int, group: int, t: int):
    """int4 with the dequantization factored out of the inner loop (``k % group == 0``).

    ``y[j] = sum_g s[j,g] * (sum_{k in g} x[k] * code[j,k] - z[j,g] * sum_{k in g} x[k])``: the
    inner loop over a group's bytes only unpacks both nibbles of a byte (constant shift / mask,
    no per-k scale or zero load), widens them to fp32 and multiplies-accumulates ``t`` output
    lanes in registers; scale and zero point are applied once per group, and the group sums of
    ``x`` are computed once per row instead of once per output tile.
    """
    from tvm import te, tirx

    groups, half = k // group, group // 2
    x = te.placeholder((m, k), "float32", name="x")
    w = te.placeholder((n // t, k // 2, t), "uint8", name="w")
    s = te.placeholder((n // t, groups, t), "float32", name="scale")
    z = te.placeholder((n // t, groups, t), "uint8", name="zero")
    r1 = te.reduce_axis((0, group), name="r1")
    xs = te.compute((m, groups), lambda i, g: te.sum(x[i, g * group + r1], axis=r1), name="xs")
    rk = te.reduce_axis((0, half), name="rk")
    mask = tirx.const(15, "uint8")
    four = tirx.const(4, "uint8")

    def pair(i, j, g, kk):
        byte = w[j // t, g * half + kk, j % t]
        base = g * group + 2 * kk
        return (x[i, base] * (byte & mask).astype("float32")
                + x[i, base + 1] * (byte >> four).astype("float32"))

    acc = te.compute((m, n, groups), lambda i, j, g: te.sum(pair(i, j, g, rk), axis=rk),
                     name="acc")
    rg = te.reduce_axis((0, groups), name="rg")
    y = te.compute((m, n), lambda i, j: te.sum(
        s[j // t, rg, j % t] * (acc[i, j, rg] - z[j // t, rg, j % t].astype("float32")
                                * xs[i, rg]), axis=rg), name="y")
    func = te.create_prim_func([x, w, s, z, y])
    name = f"slimc_linear_int4f_{m}x{k}x{n}_g{group}"
    return _finish(_schedule_int4_grouped(func, t), name)


def _tile_rows(func, t: int):
    """Common outer structure of the panel kernels: ``y[i, j] = sum_r ...`` with ``j`` split
    into ``t``-lane tiles, (tile, row) fused and parallel, ``r`` serial, the ``t`` lanes
    innermost and accumulated in a local buffer. Returns (schedule, block, r, lanes, local)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    block = sch.get_sblock("y")
    i, j, r = sch.get_loops(block)
    jo, ji = sch.split(j, [None, t])
    sch.reorder(jo, i, r, ji)
    outer = sch.fuse(jo, i)
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, outer)
    sch.parallel(outer)
    return sch, block, r, ji, local


def _schedule_int4_grouped(func, t: int):
    sch, block, rg, ji, local = _tile_rows(func, t)
    acc = sch.get_sblock("acc")
    sch.compute_at(acc, rg)
    sch.set_scope(acc, 0, "local")
    own = sch.get_loops(acc)[2:]  # below (outer, rg): the t lanes (if t > 1), then rk
    ark = own[-1]
    if t > 1:
        sch.reorder(ark, own[0])
        sch.vectorize(own[0])
        sch.vectorize(ji)
        sch.vectorize(sch.get_loops(local)[-1])
    sch.decompose_reduction(acc, ark)
    if INT4_UNROLL > 1 and (sch.get(ark).extent.value % INT4_UNROLL) == 0:
        _, inner = sch.split(ark, [None, INT4_UNROLL])
        sch.unroll(inner)
    init = sch.decompose_reduction(block, rg)
    if t > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    xs = sch.get_sblock("xs")
    sch.parallel(sch.get_loops(xs)[0])
    return sch.mod["main"]


def _finish(func, name: str):
    """Unique symbol (TE names every function ``main``) and the marks that keep it as is."""
    return (func.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True))


def _schedule_linear(func, t: int):
    """Parallel over (tile, row), k serial, the ``t`` lanes vectorized; accumulate locally."""
    sch, block, kk, ji, local = _tile_rows(func, t)
    if t > 1:  # vectorize before decompose_reduction: the update block alone is no reduction
        sch.vectorize(ji)
        sch.vectorize(sch.get_loops(local)[-1])
    init = sch.decompose_reduction(block, kk)
    if t > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"]


@functools.lru_cache(maxsize=64)
def embedding_kernel(kind: str, rows: int, vocab: int, dim: int, group: int = 0):
    """Gather ``rows`` ids from a packed table and dequantize: ``(ids, table..., out)``."""
    from tvm import s_tir, te, tirx

    ids = te.placeholder((rows,), "int64", name="ids")

    def clamp(v):  # out-of-range ids read the nearest row, never memory past the table
        return tirx.max(tirx.min(v, tirx.const(vocab - 1, "int64")), tirx.const(0, "int64"))
    if kind == "int8":
        w = te.placeholder((vocab, dim), "int8", name="w")
        s = te.placeholder((vocab,), "float32", name="scale")
        params = [ids, w, s]

        def value(i, d):
            v = clamp(ids[i])
            return w[v, d].astype("float32") * s[v]
    else:
        groups = -(-dim // group)
        w = te.placeholder((vocab, (dim + 1) // 2), "uint8", name="w")
        s = te.placeholder((vocab, groups), "float32", name="scale")
        z = te.placeholder((vocab, groups), "uint8", name="zero")
        params = [ids, w, s, z]

        def value(i, d):
            v = clamp(ids[i])
            byte = w[v, d // 2]
            code = (byte >> ((d % 2) * 4).astype("uint8")) & tirx.const(15, "uint8")
            return ((code.astype("float32") - z[v, d // group].astype("float32"))
                    * s[v, d // group])
    out = te.compute((rows, dim), value, name="out")
    sch = s_tir.Schedule(te.create_prim_func([*params, out]))
    i, d = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(i)
    name = f"slimc_embedding_{kind}_{rows}x{vocab}x{dim}" + (f"_g{group}" if group else "")
    return _finish(sch.mod["main"], name)


# ---------------------------------------------------------------------------------------------
# Relax converters (``slimc_register_converters``)
# ---------------------------------------------------------------------------------------------


def add_kernel(bb, func):
    """Add a hand-scheduled kernel to the module being built; its ``GlobalVar``.

    The kernel's ``global_symbol`` (it lets tests build a kernel on its own) is dropped: in the
    model it is an internal function, which passes may copy and dead-code elimination may then
    remove; the build names it again when it exports the library.
    """
    return bb.add_func(func.without_attr("global_symbol"), str(func.attrs["global_symbol"]))


def _static_shape(expr) -> tuple[int, ...]:
    shape = expr.ty.shape
    dims = []
    for d in shape:
        if not hasattr(d, "value"):
            from slimc.errors import LoweringError

            raise LoweringError(f"slimc's quantized kernels need static shapes, got {shape}.")
        dims.append(int(d.value))
    return tuple(dims)


def _tiles(bb, weight, t: int):
    """``[N, A]`` -> ``[N/t, A, t]`` (folded into a new packed constant at build time)."""
    from tvm import relax

    n, a = _static_shape(weight)
    tiled = bb.emit(relax.op.reshape(weight, (n // t, t, a)))
    return bb.emit(relax.op.permute_dims(tiled, [0, 2, 1]))


def _arg(importer, node, index: int):
    value = node.args[index] if index < len(node.args) else None
    return None if value is None else importer.env[value]


def _convert_linear(kind: str):
    def convert(node, importer):
        from tvm import relax

        bb = importer.block_builder
        x = importer.env[node.args[0]]
        weight = importer.env[node.args[1]]
        shape = _static_shape(x)
        k, n = shape[-1], _static_shape(weight)[0]
        m = 1
        for d in shape[:-1]:
            m *= d
        t = tile_for(n, kind)
        if kind == "int8":
            bias, act = _arg(importer, node, 3), _arg(importer, node, 4)
            tensors = [_tiles(bb, weight, t), importer.env[node.args[2]]]
            func = linear_kernel("int8", m, k, n)
        elif kind == "int4":
            bias, act = _arg(importer, node, 4), _arg(importer, node, 5)
            group = int(node.args[6])
            packed = weight
            if _pads_to_groups(k, group):
                # A partial last group (K=576, g128): zero-pad x and the codes to whole groups
                # so the factored kernel applies (padded x is 0, so the codes never count).
                padded = -(-k // group) * group
                packed = bb.emit(relax.op.nn.pad(weight, [0, 0, 0, (padded - k) // 2]))
            tensors = [_tiles(bb, packed, t), _tiles(bb, importer.env[node.args[2]], t),
                       _tiles(bb, importer.env[node.args[3]], t)]
            func = linear_kernel("int4", m, k, n, group)
        else:
            bias, act = _arg(importer, node, 2), None
            tensors = [_tiles(bb, weight, t)]
            func = linear_kernel(kind, m, k, n)
        if act is not None:
            x = bb.emit(relax.op.multiply(x, act))
        x2 = bb.emit(relax.op.reshape(x, (m, k)))
        if kind == "int4" and _pads_to_groups(k, group):
            x2 = bb.emit(relax.op.nn.pad(x2, [0, 0, 0, -(-k // group) * group - k]))
        gvar = add_kernel(bb, func)
        y = bb.emit(relax.call_tir(gvar, [x2, *tensors],
                                   relax.TensorType((m, n), "float32")))
        y = bb.emit(relax.op.reshape(y, (*shape[:-1], n)))
        if bias is not None:
            y = bb.emit(relax.op.add(y, bias))
        return y

    return convert


def _convert_w8a8(node, importer):
    """Quantize ``x`` (fused elementwise Relax ops), then the target's int8 dot kernel.

    The kernel is chosen from ``tvm.target.Target.current()`` (``lower_to_relax`` enters the
    build target): VNNI or sdot where the target has them and the shape fits their tiles, the
    generic int8 kernel otherwise.
    """
    import numpy as np
    from slimc.backends.tvm import int8_kernels
    from tvm import relax
    from tvm.target import Target

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    weight = importer.env[node.args[1]]
    in_mult, out_scale = importer.env[node.args[2]], importer.env[node.args[3]]
    bias = _arg(importer, node, 4)
    zero_point = int(node.args[5])
    shape = _static_shape(x)
    k, n = shape[-1], _static_shape(weight)[0]
    m = int(np.prod(shape[:-1], dtype=np.int64))
    kind = int8_kernels.kernel_kind(Target.current(allow_none=True))
    if kind != "generic" and (k % 4 or n % int8_kernels.lanes(kind)):
        kind = "generic"
    codes = bb.emit(relax.op.round(relax.op.multiply(relax.op.reshape(x, (m, k)), in_mult)))
    offset = int8_kernels.activation_offset(kind)
    if zero_point:
        codes = bb.emit(relax.op.add(codes, relax.const(float(zero_point), "float32")))
    codes = bb.emit(relax.op.clip(codes, -128, 127))
    if offset:
        codes = bb.emit(relax.op.add(codes, relax.const(float(offset), "float32")))
    codes = bb.emit(relax.op.astype(codes, int8_kernels.activation_dtype(kind)))
    # sum_k (a + c) w = sum_k a w + c sum_k w, c = zero point (+ VNNI's unsigned offset):
    # take it back out in integers (in float it would cancel catastrophically).
    shift = zero_point + offset
    comp = relax.const(np.zeros(n, np.int32))
    if shift:
        comp = bb.emit(relax.op.multiply(
            relax.op.sum(relax.op.astype(weight, "int32"), axis=[1]),
            relax.const(shift, "int32")))
    if kind == "generic":
        t = tile_for(n)
        packed = _tiles(bb, weight, t)
        func = int8_kernels.generic_kernel(m, k, n, t)
    else:
        lanes = int8_kernels.lanes(kind)
        tiles = bb.emit(relax.op.reshape(weight, (n // lanes, lanes, k // 4, 4)))
        packed = bb.emit(relax.op.permute_dims(tiles, [0, 2, 1, 3]))
        func = int8_kernels.dot_kernel(kind, m, k, n)
    if bias is None:
        bias = relax.const(np.zeros(n, np.float32))
    gvar = add_kernel(bb, func)
    y = bb.emit(relax.call_tir(gvar, [codes, packed, comp, out_scale, bias],
                               relax.TensorType((m, n), "float32")))
    return bb.emit(relax.op.reshape(y, (*shape[:-1], n)))


def _convert_embedding(kind: str):
    def convert(node, importer):
        from tvm import relax

        bb = importer.block_builder
        table = importer.env[node.args[0]]
        vocab, width = _static_shape(table)
        if kind == "int8":
            ids_node, dim, group, extra = node.args[2], width, 0, [importer.env[node.args[1]]]
        else:
            ids_node, group = node.args[3], int(node.args[4])
            scale = importer.env[node.args[1]]
            dim = embedding_int4_dim(width, _static_shape(scale)[1], group)
            extra = [scale, importer.env[node.args[2]]]
        ids = importer.env[ids_node]
        ids_shape = _static_shape(ids)
        rows = 1
        for d in ids_shape:
            rows *= d
        flat = bb.emit(relax.op.reshape(relax.op.astype(ids, "int64"), (rows,)))
        func = embedding_kernel(kind, rows, vocab, dim, group)
        gvar = add_kernel(bb, func)
        out = bb.emit(relax.call_tir(gvar, [flat, table, *extra],
                                     relax.TensorType((rows, dim), "float32")))
        return bb.emit(relax.op.reshape(out, (*ids_shape, dim)))

    return convert


def converters() -> dict[str, Any]:
    """Converters keyed like TVM's ``custom_convert_map`` (``OpOverload.__name__``)."""
    table = {f"linear_{kind}": _convert_linear(kind) for kind in ("int8", "int4", "fp16", "bf16")}
    table.update({f"embedding_{kind}": _convert_embedding(kind) for kind in ("int8", "int4")})
    table["linear_w8a8"] = _convert_w8a8
    return {OPS[name].__name__: fn for name, fn in table.items()}


def constant_bytes(mod, target=None) -> dict[str, int]:
    """Bytes of tensor constants per dtype after legalization and ``FoldConstant``.

    This is what ends up in the artifact's constant pool: if a dequantize were ever folded
    into an fp32 weight, it would show up here as float32 bytes.
    """
    import tvm
    from tvm import relax

    target = tvm.target.Target(target or {"kind": "llvm"})
    with target:
        mod = tvm.transform.Sequential([
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(),
            relax.transform.FuseTIR()])(mod)
    sizes: dict[str, int] = {}

    def visit(expr) -> None:
        value = getattr(expr, "value", None) if type(expr).__name__ in (
            "Constant", "GenericConst") else getattr(expr, "data", None)
        if value is not None and hasattr(value, "numpy"):
            array = value.numpy()
            sizes[str(array.dtype)] = sizes.get(str(array.dtype), 0) + array.nbytes

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return sizes
