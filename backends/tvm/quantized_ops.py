"""CPU (``llvm``) lowerings of slimc's quantized ops (the dialect: ``slimc/dialect.py``).

Each lowering turns one ``slimc::*`` op into an ``R.call_tir`` of a hand-scheduled TIR kernel
that unpacks and dequantizes *inside* the matmul (or gather) loop nest, so ``FoldConstant``
can only fold the layout change of the packed weight (int8 stays int8).

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

import dataclasses
import functools
from typing import Any

import torch  # noqa: F401 - the ops below are registered with torch on import
from slimc.backends.tvm.tied_tables import ROWS, TableLayout, head_reading, packed_once

from slimc.dialect import (  # noqa: F401 - re-exported: the dialect used to live here
    KERNEL_FLOAT_NOISE,
    OPS,
    ROW_TINY,
    dequantize_int4,
    dequantize_int8,
    embedding_int4,
    embedding_int4_dim,
    embedding_int8,
    linear_bf16,
    linear_fp16,
    linear_int4,
    linear_int8,
    linear_w8a8,
    quantize_activation,
    register_lowering,
    rounding_noise_floor,
    unpack_int4,
)

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
def linear_kernel(kind: str, m: int, k: int, n: int, group: int = 0, tile: int = 0,
                  zero_dtype: str = "uint8"):
    """A scheduled PrimFunc ``(x[m,k], weight tiles..., y[m,n])`` with dequant in the loop.

    ``zero_dtype``: int4 zero points are ``uint8`` (integer grid points), or ``float16`` for
    ``zero_point=float`` grids (a per-group minimum beside an fp16 scale, GGUF's Q4_1 layout).

    int4 with a partial last group takes ``x[m, K']``, ``K'`` = ``k`` rounded up to whole
    groups (the converter pads x and the packed codes with zeros).
    """
    from tvm import te, tirx

    t = tile or tile_for(n, kind)
    if kind == "int4" and _pads_to_groups(k, group):
        k = -(-k // group) * group
    if kind == "int4" and FACTORED_INT4 and group % 2 == 0 and k % group == 0:
        return _int4_grouped_kernel(m, k, n, group, t, zero_dtype)
    if zero_dtype == CODED:
        raise ValueError("coded (-qs) int4 grids need the factored kernel (an even group)")
    x = te.placeholder((row_var(m), k), "float32", name="x")
    r = te.reduce_axis((0, k), name="k")
    if kind == "int8":
        w = te.placeholder((n // t, k, t), "int8", name="w")
        s = te.placeholder((n,), "float32", name="scale")
        params = [x, w, s]

        # Converted in its own stage: a row-blocked schedule converts each weight once per
        # ROW_BLOCK rows (see _schedule_int8_rows); otherwise it is inlined into the sum.
        wf = te.compute((n, k), lambda j, kk: w[j // t, kk, j % t].astype("float32"),
                        name="wf")

        def deq(j, kk):  # the per-column scale is applied once, after the sum
            return wf[j, kk]
    elif kind == "int4":
        groups = -(-k // group)
        w = te.placeholder((n // t, (k + 1) // 2, t), "uint8", name="w")
        s = te.placeholder((n // t, groups, t), scale_dtype(zero_dtype), name="scale")
        z = te.placeholder((n // t, groups, t), zero_dtype, name="zero")
        params = [x, w, s, z]

        def deq(j, kk):
            byte = w[j // t, kk // 2, j % t]
            code = (byte >> ((kk % 2) * 4).astype("uint8")) & tirx.const(15, "uint8")
            g = kk // group
            return int4_value(code, s[j // t, g, j % t], z[j // t, g, j % t], zero_dtype)
    elif kind in ("fp16", "bf16", "fp32"):
        dtype = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[kind]
        w = te.placeholder((n // t, k, t), dtype, name="w")
        params = [x, w]

        def deq(j, kk):
            return w[j // t, kk, j % t].astype("float32")
    else:
        raise ValueError(kind)
    y = te.compute((x.shape[0], n), lambda i, j: te.sum(x[i, r] * deq(j, r), axis=r),
                   name="y")
    if kind == "int8":  # y = s * sum(x * w): one multiply per output, not one per weight
        y = te.compute(y.shape, lambda i, j: y[i, j] * s[j], name="scaled")
    func = te.create_prim_func([*params, y], index_dtype(m))
    name = f"slimc_linear_{kind}_{m or 'dyn'}x{k}x{n}" + (f"_g{group}" if group else "") \
        + (f"_t{t}" if tile else "") + _zero_suffix(zero_dtype)
    if kind == "int8":
        rows = row_block(m)
        func = (_schedule_int8_rows(func, t, rows) if rows > 1
                else _schedule_linear(func, t, scaled=True, inline="wf"))
        return _finish(func, name)
    return _finish(_schedule_linear(func, t), name)


def scale_dtype(zero_dtype: str) -> str:
    """dtype of an int4 grid's scales: fp16 beside an fp16 group minimum (``float_zero``, the
    Q4_1 layout), fp32 beside an integer zero point."""
    return "float16" if zero_dtype == "float16" else "float32"


def int4_value(code, scale, zero, zero_dtype: str):
    """TE expression of one int4 code's float value on its group's grid (the TIR twin of
    :func:`slimc.dialect.int4_grid_values`): ``code * scale + minimum`` for a floating zero,
    ``(code - zero) * scale`` for an integer zero point."""
    if zero_dtype != "uint8":
        return code.astype("float32") * scale.astype("float32") + zero.astype("float32")
    return (code.astype("float32") - zero.astype("float32")) * scale


def _zero_suffix(zero_dtype: str) -> str:
    return "" if zero_dtype == "uint8" else "_qs" if zero_dtype == CODED else "_fz"


#: ``zero_dtype`` of a ``-qs`` grid read as its codes (:mod:`slimc.coded_scales`): the kernel
#: takes ``scale_code uint8``, ``min_code int8`` tiles and the two fp16 row units, and decodes
#: each group's step and minimum where it applies them (once per group and output).
CODED = "coded"


def coded_factored(k: int, group: int) -> bool:
    """Whether an int4 linear of ``k`` inputs runs the factored kernel, which can read a
    ``-qs`` grid's codes directly (else the grid is rebuilt by ``slimc::coded_scale``)."""
    return FACTORED_INT4 and group % 2 == 0 and (k % group == 0 or _pads_to_groups(k, group))


def zero_dtype_of(expr) -> str:
    """dtype of an int4 zero-point operand (``uint8`` or ``float32``)."""
    return str(expr.ty.dtype)


def _int4_grouped_kernel(m: int, k: int, n: int, group: int, t: int,
                         zero_dtype: str = "uint8"):
    """int4 with the dequantization factored out of the inner loop (``k % group == 0``).

    ``y[j] = sum_g s[j,g] * (sum_{k in g} x[k] * code[j,k] - z[j,g] * sum_{k in g} x[k])``: the
    inner loop over a group's bytes only unpacks both nibbles of a byte (constant shift / mask,
    no per-k scale or zero load), widens them to fp32 and multiplies-accumulates ``t`` output
    lanes in registers; scale and zero point are applied once per group, and the group sums of
    ``x`` are computed once per row instead of once per output tile.
    """
    from tvm import te, tirx

    groups, half = k // group, group // 2
    x = te.placeholder((row_var(m), k), "float32", name="x")
    rows = x.shape[0]
    w = te.placeholder((n // t, k // 2, t), "uint8", name="w")
    coded = zero_dtype == CODED
    s = te.placeholder((n // t, groups, t), "uint8" if coded else scale_dtype(zero_dtype),
                       name="scale")
    z = te.placeholder((n // t, groups, t), "int8" if coded else zero_dtype, name="zero")
    units = [te.placeholder((n // t, t), "float16", name=name)
             for name in ("scale_unit", "min_unit")] if coded else []
    r1 = te.reduce_axis((0, group), name="r1")
    xs = te.compute((rows, groups), lambda i, g: te.sum(x[i, g * group + r1], axis=r1), name="xs")
    rk = te.reduce_axis((0, half), name="rk")
    mask = tirx.const(15, "uint8")
    four = tirx.const(4, "uint8")

    def pair(i, j, g, kk):
        byte = w[j // t, g * half + kk, j % t]
        base = g * group + 2 * kk
        return (x[i, base] * (byte & mask).astype("float32")
                + x[i, base + 1] * (byte >> four).astype("float32"))

    acc = te.compute((rows, n, groups), lambda i, j, g: te.sum(pair(i, j, g, rk), axis=rk),
                     name="acc")
    rg = te.reduce_axis((0, groups), name="rg")

    def decoded(code, unit, j):  # fp16(code * unit), as slimc.coded_scales.decode
        product = code.astype("float32") * unit[j // t, j % t].astype("float32")
        return product.astype("float16").astype("float32")

    def group_term(i, j, g):  # sum_k x w over group g, from the code sums and x's group sum
        scale, zero = s[j // t, g, j % t].astype("float32"), z[j // t, g, j % t]
        if coded:  # a -qs grid: step and minimum decoded from their codes here
            scale = decoded(s[j // t, g, j % t], units[0], j)
            return scale * acc[i, j, g] + decoded(zero, units[1], j) * xs[i, g]
        if zero_dtype != "uint8":  # w = code * scale + minimum
            return scale * acc[i, j, g] + zero.astype("float32") * xs[i, g]
        return scale * (acc[i, j, g] - zero.astype("float32") * xs[i, g])

    y = te.compute((rows, n), lambda i, j: te.sum(group_term(i, j, rg), axis=rg), name="y")
    func = te.create_prim_func([x, w, s, z, *units, y], index_dtype(m))
    name = f"slimc_linear_int4f_{m or 'dyn'}x{k}x{n}_g{group}" + _zero_suffix(zero_dtype)
    rows = int4_row_block(m, t)
    if rows > 1:
        return _finish(_schedule_int4_row_block(func, t, rows), name + f"_r{rows}")
    return _finish(_schedule_int4_grouped(func, t), name)


#: Rows of x that share each unpacked weight vector in the int4 kernel (prefill shapes); 4 rows
#: x 16 lanes of accumulators still fit 128-bit NEON registers (8 measured 5-20% faster on
#: AVX-512 but would spill on aarch64).
INT4_ROW_BLOCKS = (4, 2)


def int4_row_block(m: int | None, lanes: int = 2) -> int:
    """Rows per register block of the int4 kernel: unpacking the codes costs as much as the
    multiply-adds, so with several rows each unpacked byte feeds ``rows`` FMA chains.

    One-lane tiles (a layer with a single output, e.g. Qwen2-MoE's shared-expert gate) keep
    one row: their lane loop has extent 1 and TVM drops it, which the row-block schedule's
    loop nest does not expect."""
    if not isinstance(m, int) or m < 2 or lanes < 2:
        return 1
    return next((r for r in INT4_ROW_BLOCKS if m % r == 0), 1)


def _schedule_int4_row_block(func, t: int, rows: int):
    """:func:`_schedule_int4_grouped` with ``rows`` rows per task: parallel over (tile, row
    block); per group, the byte loop is outermost and the rows x ``t`` lanes accumulate in
    registers (rows unrolled, lanes vectorized), so each byte is unpacked once per block."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    block = sch.get_sblock("y")
    i, j, rg = sch.get_loops(block)
    jo, ji = sch.split(j, [None, t])
    io, ii = sch.split(i, [None, rows])
    sch.reorder(jo, io, rg, ii, ji)
    outer = sch.fuse(jo, io)
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, outer)
    sch.parallel(outer)
    acc = sch.get_sblock("acc")
    sch.compute_at(acc, rg)
    sch.set_scope(acc, 0, "local")
    a_rows, a_lanes, a_rk = sch.get_loops(acc)[2:]
    sch.reorder(a_rk, a_rows, a_lanes)
    if t > 1:
        sch.vectorize(a_lanes)
        sch.vectorize(ji)
        sch.vectorize(sch.get_loops(local)[-1])
    sch.unroll(a_rows)
    sch.unroll(ii)
    sch.decompose_reduction(acc, a_rk)
    init = sch.decompose_reduction(block, rg)
    if t > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    xs = sch.get_sblock("xs")
    sch.parallel(sch.get_loops(xs)[0])
    return sch.mod["main"]


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


def _schedule_linear(func, t: int, scaled: bool = False, inline: str | None = None):
    """Parallel over (tile, row), k serial, the ``t`` lanes vectorized; accumulate locally.
    ``scaled``: the function ends with a ``scaled`` block (int8's per-column scale);
    ``inline``: a producer block computed inside the sum instead (int8's conversion)."""
    if inline:
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        sch.compute_inline(sch.get_sblock(inline))
        func = sch.mod["main"]
    sch, block, kk, ji, local = _tile_rows(func, t)
    if scaled:  # the epilogue runs on the accumulator as it is written back
        sch.reverse_compute_inline(sch.get_sblock("scaled"))
    if t > 1:  # vectorize before decompose_reduction: the update block alone is no reduction
        sch.vectorize(ji)
        sch.vectorize(sch.get_loops(local)[-1])
    init = sch.decompose_reduction(block, kk)
    if t > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"]


#: Rows of ``x`` that share each converted int8 weight vector (static row counts of at least
#: this many; 1 = no blocking) and the lanes of one such vector (accumulators: ROW_BLOCK x
#: INT8_LANES floats, 16 NEON / 8 AVX2 registers).
ROW_BLOCK = 4
INT8_LANES = 16


def row_block(m: int | None) -> int:
    """Rows per block of the int8 kernel: ``ROW_BLOCK`` (or 2) dividing a static ``m``, else 1
    (one row: decode; symbolic rows: the per-row kernel)."""
    if m is None:
        return 1
    return next((b for b in (ROW_BLOCK, 2) if b <= ROW_BLOCK and m % b == 0), 1)


def _schedule_int8_rows(func, t: int, rows: int):
    """int8 with ``rows`` rows per block: each weight is converted to fp32 once per block.

    Why: converting int8 to fp32 costs more than the multiply-add it feeds (a shuffle and a
    fixed-point convert per 4 lanes on aarch64, and under qemu that convert is emulated one
    lane at a time), and the per-row kernel converts every weight once per row of ``x``.
    Loops: (tile, row block) parallel, ``INT8_LANES``-lane slices of the tile, k, then the block's
    rows unrolled around one converted vector (accumulators stay in registers).
    """
    from tvm import s_tir

    lanes = INT8_LANES if t % INT8_LANES == 0 else t
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("y")
    i, j, r = sch.get_loops(block)
    jo, jq, jl = sch.split(j, [None, t // lanes, lanes])
    io, ii = sch.split(i, [None, rows])
    sch.reorder(jo, io, jq, r, ii, jl)
    outer = sch.fuse(jo, io)
    sch.parallel(outer)
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_inline(sch.get_sblock("scaled"))
    sch.reverse_compute_at(local, jq)
    wf = sch.get_sblock("wf")
    sch.compute_at(wf, r)
    sch.set_scope(wf, 0, "local")
    if lanes > 1:
        sch.vectorize(sch.get_loops(wf)[-1])
        sch.vectorize(jl)
        sch.vectorize(sch.get_loops(local)[-1])
    init = sch.decompose_reduction(block, r)
    if lanes > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(ii)
    return sch.mod["main"]


@functools.lru_cache(maxsize=64)
def embedding_kernel(kind: str, rows: int, vocab: int, dim: int, group: int = 0,
                     zero_dtype: str = "uint8", layout: TableLayout = ROWS):
    """Gather ``rows`` ids from a packed table and dequantize: ``(ids, table..., out)``.

    ``layout``: where the table's rows live (:mod:`tied_tables`: a tied table is read in its
    output head's packed layout, so the library holds it once); int4 grids share its tiling.
    """
    from tvm import s_tir, te, tirx

    ids = te.placeholder((row_var(rows),), "int64", name="ids")

    def clamp(v):  # out-of-range ids read the nearest row, never memory past the table
        return tirx.max(tirx.min(v, tirx.const(vocab - 1, "int64")), tirx.const(0, "int64"))
    if kind == "int8":
        w = te.placeholder(layout.shape(vocab, dim), "int8", name="w")
        s = te.placeholder((vocab,), "float32", name="scale")
        params = [ids, w, s]

        def value(i, d):
            v = clamp(ids[i])
            return layout.at(w, v, d).astype("float32") * s[v]
    else:
        groups = -(-dim // group)
        grid = dataclasses.replace(layout, width=0)
        w = te.placeholder(layout.shape(vocab, (dim + 1) // 2), "uint8", name="w")
        s = te.placeholder(grid.shape(vocab, groups), scale_dtype(zero_dtype), name="scale")
        z = te.placeholder(grid.shape(vocab, groups), zero_dtype, name="zero")
        params = [ids, w, s, z]

        def value(i, d):
            v = clamp(ids[i])
            byte = layout.at(w, v, d // 2)
            code = (byte >> ((d % 2) * 4).astype("uint8")) & tirx.const(15, "uint8")
            return int4_value(code, grid.at(s, v, d // group), grid.at(z, v, d // group),
                              zero_dtype)
    out = te.compute((ids.shape[0], dim), value, name="out")
    sch = s_tir.Schedule(te.create_prim_func([*params, out], index_dtype(rows)))
    i, d = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(i)
    name = f"slimc_embedding_{kind}_{rows or 'dyn'}x{vocab}x{dim}" + (
        f"_g{group}" if group else "") + _zero_suffix(zero_dtype) + layout.suffix
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


def _rows_and_width(expr) -> tuple[Any, int]:
    """``(rows, width)`` of a ``[..., width]`` activation: rows may be symbolic (a dynamic
    batch or sequence length, ``None`` to the kernel builders), the width must be static."""
    shape = list(expr.ty.shape)
    *lead, last = shape
    if not hasattr(last, "value"):
        from slimc.errors import LoweringError

        raise LoweringError(f"slimc's quantized kernels need a static last dim, got {shape}.")
    rows = 1
    for d in lead:
        rows = rows * (int(d.value) if hasattr(d, "value") else d)
    return rows, int(last.value)


def kernel_rows(rows) -> int | None:
    """The kernel builders' ``m``: an int, or None for a symbolic row count."""
    return rows if isinstance(rows, int) else None


def row_var(m: int | None, dtype: str = "int64"):
    """``m`` itself, or a fresh symbolic row count bound from the input's shape at run time."""
    from tvm import tirx

    return m if m is not None else tirx.Var("m", dtype)


def index_dtype(m: int | None) -> str | None:
    """Loop index dtype of a kernel: int64 throughout when its row count is symbolic (Relax's
    shape vars are int64; mixed with int32 loops, fused loops need casts that are not affine
    and the schedules fail)."""
    return "int64" if m is None else None


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


def _int8_tiles(importer, node) -> tuple[TableLayout, Any]:
    """The int8 linear ``node``'s weight tiles and their layout, built once per import (a tied
    embedding gather reads the same tiles, :mod:`tied_tables`)."""
    weight = importer.env[node.args[1]]
    t = tile_for(_static_shape(weight)[0], "int8")
    tiles = packed_once(importer, node, "int8",
                        lambda: _tiles(importer.block_builder, weight, t))
    return TableLayout("tiles", t), tiles


def _int4_padded_bytes(k: int, group: int) -> int | None:
    """Code bytes per row after padding ``k`` inputs to whole groups, where the factored kernel
    needs it (a partial last group, K=576 at g128), else None."""
    return -(-k // group) * group // 2 if _pads_to_groups(k, group) else None


def _int4_codes_padded(bb, weight, k: int, group: int):
    """The int4 codes ``[N, ceil(K/2)]``, zero-padded to whole groups where the factored kernel
    needs it: a partial last group is padded in x and the codes so the factored kernel
    applies (padded x is 0, so the codes never count)."""
    from tvm import relax

    padded = _int4_padded_bytes(k, group)
    if padded is None:
        return weight
    return bb.emit(relax.op.nn.pad(weight, [0, 0, 0, padded - k // 2]))


def _int4_tiles(importer, node, k: int) -> tuple[TableLayout, list]:
    """The int4 linear ``node``'s tiled codes, scales and zero points and the codes' layout,
    built once per import (shared with a tied embedding gather)."""
    bb = importer.block_builder
    weight = importer.env[node.args[1]]
    n, width = _static_shape(weight)
    group = int(node.args[6])
    t = tile_for(n, "int4")

    def make():
        packed = _int4_codes_padded(bb, weight, k, group)
        return [_tiles(bb, packed, t), _tiles(bb, importer.env[node.args[2]], t),
                _tiles(bb, importer.env[node.args[3]], t)]

    padded = _int4_padded_bytes(k, group)
    return TableLayout("tiles", t, width=padded if padded not in (None, width) else 0), \
        packed_once(importer, node, "int4", make)


def _arg(importer, node, index: int):
    value = node.args[index] if index < len(node.args) else None
    return None if value is None else importer.env[value]


def _convert_linear(kind: str):
    def convert(node, importer):
        from tvm import relax

        bb = importer.block_builder
        x = importer.env[node.args[0]]
        weight = importer.env[node.args[1]]
        shape = list(x.ty.shape)
        m, k = _rows_and_width(x)
        n = _static_shape(weight)[0]
        t = tile_for(n, kind)
        if kind == "int8":
            bias, act = _arg(importer, node, 3), _arg(importer, node, 4)
            tensors = [_int8_tiles(importer, node)[1], importer.env[node.args[2]]]
            func = linear_kernel("int8", kernel_rows(m), k, n)
        elif kind == "int4":
            bias, act = _arg(importer, node, 4), _arg(importer, node, 5)
            group = int(node.args[6])
            coded = _coded_operands(importer, node, k, group)
            if coded is not None:  # a -qs grid: the kernel decodes its codes
                zdtype = CODED
                packed = _int4_codes_padded(bb, weight, k, group)
                tensors = [_tiles(bb, packed, t), _tiles(bb, coded[0], t),
                           _tiles(bb, coded[1], t),
                           *(bb.emit(relax.op.reshape(u, (n // t, t))) for u in coded[2:])]
            else:
                zdtype = zero_dtype_of(importer.env[node.args[3]])
                tensors = _int4_tiles(importer, node, k)[1]
            func = linear_kernel("int4", kernel_rows(m), k, n, group, zero_dtype=zdtype)
        else:
            bias, act = _arg(importer, node, 2), None
            tensors = [_tiles(bb, weight, t)]
            func = linear_kernel(kind, kernel_rows(m), k, n)
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


def _coded_operands(importer, node, k: int, group: int) -> list | None:
    """``[scale_code, min_code, scale_unit, min_unit]`` (Relax values) when an int4 linear's
    grid is a ``-qs`` grid of 8-bit codes rebuilt by ``slimc::coded_scale`` nodes and the
    factored kernel applies: the kernel then reads the codes (no rebuilt fp16 grid, no extra
    kernels); the rebuild nodes, left unused, are dropped as dead code."""
    scale, zero = node.args[2], node.args[3]
    coded = OPS["coded_scale"]
    if not (getattr(scale, "target", None) is coded and getattr(zero, "target", None) is coded
            and coded_factored(k, group)) or len(scale.args) > 3 or len(zero.args) > 3 \
            or scale.kwargs or zero.kwargs:
        # narrower codes (-qs5) are bit-packed: the fp16 grid is rebuilt by their own kernel
        return None
    return [importer.env[scale.args[0]], importer.env[zero.args[0]],
            importer.env[scale.args[1]], importer.env[zero.args[1]]]


def _convert_w8a8(node, importer):
    """Quantize ``x`` (fused elementwise Relax ops), then the target's int8 dot kernel.

    The kernel is chosen from ``tvm.target.Target.current()`` (``lower_to_relax`` enters the
    build target): VNNI, AVX2 or sdot where the target has them and the shape fits their tiles
    (``K`` is zero-padded to a multiple of 4), the generic int8 kernel otherwise.
    """
    from slimc.backends.tvm import int8_kernels
    from tvm import relax

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    weight = importer.env[node.args[1]]
    in_mult, out_scale = importer.env[node.args[2]], importer.env[node.args[3]]
    bias = _arg(importer, node, 4)
    zero_point = int(node.args[5])
    per_row = len(node.args) > 6 and bool(node.args[6])
    shape = list(x.ty.shape)
    m, k = _rows_and_width(x)
    n = _static_shape(weight)[0]
    kind = _w8a8_kind(n)
    x2 = bb.emit(relax.op.reshape(x, (m, k)))
    row_scale = None
    if per_row:
        codes, row_scale = quantize_row_codes(bb, x2, in_mult, kind)
    else:
        codes = quantize_codes(bb, x2, in_mult, zero_point, kind)
    kp = -(-k // int8_kernels.K_MULTIPLE) * int8_kernels.K_MULTIPLE
    if kind != "generic" and kp != k:
        # Zero weight columns (build time): whatever the padded codes are, they add 0.
        codes = bb.emit(relax.op.nn.pad(codes, [0, 0, 0, kp - k]))
        k = kp
    y = int8_matmul(bb, kind, codes, weight, out_scale, bias, zero_point, m, k, n,
                    packed=_w8a8_packed(importer, node)[1], row_scale=row_scale)
    return bb.emit(relax.op.reshape(y, (*shape[:-1], n)))


def quantize_row_codes(bb, x, in_mult, kind: str):
    """Per-row (dynamic) int8 codes of ``x [m, k]`` as the ``kind`` kernel reads them, and the
    rows' scales ``[m]``: :func:`slimc.dialect.quantize_rows` in one kernel
    (:func:`row_quantize_kernel`)."""
    from slimc.backends.tvm import int8_kernels
    from tvm import relax

    m, k = _rows_and_width(x)
    func = row_quantize_kernel(kernel_rows(m), k, int8_kernels.activation_dtype(kind),
                               int8_kernels.activation_offset(kind))
    out = bb.emit(relax.call_tir(add_kernel(bb, func), [x, in_mult], [
        relax.TensorType((m, k), int8_kernels.activation_dtype(kind)),
        relax.TensorType((m,), "float32")]))
    return bb.emit(relax.TupleGetItem(out, 0)), bb.emit(relax.TupleGetItem(out, 1))


#: Lanes of the row maximum's partial maxima (one AVX-512 / two NEON vectors).
ROW_LANES = 16


@functools.lru_cache(maxsize=128)
def row_quantize_kernel(m: int | None, k: int, dtype: str, offset: int):
    """``(x[m,k], mult[k], codes[m,k], rs[m])``: per row ``s = x * mult``, ``amax =
    max(max_k |s|, ROW_TINY)``, ``codes = clamp(round(s * (127 / amax)), -127, 127) +
    offset`` in ``dtype``, ``rs = amax / 127`` (:func:`slimc.dialect.quantize_rows`, same
    float operations in the same order). Parallel over rows; the maximum is taken in
    ``ROW_LANES`` vector lanes, then across them (a generic reduction ran scalar: 35 of 326
    ms in SmolLM2's prefill)."""
    from tvm import s_tir, te, tirx

    x = te.placeholder((row_var(m), k), "float32", name="x")
    mult = te.placeholder((k,), "float32", name="mult")
    rows, lanes = x.shape[0], ROW_LANES
    ko = te.reduce_axis((0, -(-k // lanes)), name="ko")

    def magnitude(i, c):
        value = tirx.abs(x[i, c] * mult[c])
        if k % lanes:  # the last chunk's missing columns count as 0 (every |s| is >= 0)
            return tirx.if_then_else(c < k, value, tirx.const(0.0, "float32"))
        return value

    part = te.compute((rows, lanes), lambda i, j: te.max(magnitude(i, ko * lanes + j),
                                                          axis=ko), name="part")
    li = te.reduce_axis((0, lanes), name="li")
    amax = te.compute((rows,), lambda i: te.max(part[i, li], axis=li), name="amax")

    c127 = tirx.const(127.0, "float32")

    def stats(i):
        clamped = tirx.max(amax[i], tirx.const(ROW_TINY, "float32"))
        return c127 / clamped, clamped / c127

    inv, rs = te.compute((rows,), stats, name="stats")
    codes = te.compute((rows, k), lambda i, j: (tirx.max(tirx.min(tirx.round(
        x[i, j] * mult[j] * inv[i]), c127), -c127)
        + tirx.const(float(offset), "float32")).astype(dtype), name="codes")
    sch = s_tir.Schedule(te.create_prim_func([x, mult, codes, rs], index_dtype(m)))
    i, j = sch.get_loops(sch.get_sblock("codes"))
    sch.parallel(i)
    if k >= lanes:
        _, jv = sch.split(j, [None, lanes])
        sch.vectorize(jv)
    sch.compute_at(sch.get_sblock("stats_v0"), i)  # TE gives each output its own block
    row = sch.get_loops(sch.get_sblock("amax"))[0]  # the maximum: its own parallel row loop
    sch.parallel(row)
    sch.compute_at(sch.get_sblock("part"), row)
    part_block = sch.get_sblock("part")
    pj, pk = sch.get_loops(part_block)[1:]
    sch.reorder(pk, pj)
    sch.vectorize(pj)  # before decompose_reduction: the update block alone is no reduction
    init = sch.decompose_reduction(part_block, pk)
    sch.vectorize(sch.get_loops(init)[-1])
    name = f"slimc_row_quantize_{m or 'dyn'}x{k}_{dtype}" + (f"_o{offset}" if offset else "")
    return _finish(sch.mod["main"], name)


def _w8a8_kind(n: int) -> str:
    """The int8 kernel of a W8A8 linear with ``n`` outputs on the current target."""
    from slimc.backends.tvm import int8_kernels
    from tvm.target import Target

    kind = int8_kernels.kernel_kind(Target.current(allow_none=True))
    if kind != "generic" and n % int8_kernels.lanes(kind):
        return "generic"
    return kind


def _w8a8_packed(importer, node) -> tuple[TableLayout, Any]:
    """The W8A8 linear ``node``'s packed weight and its layout, built once per import (a tied
    embedding gather reads it, :mod:`tied_tables`); the dot-product kinds' ``K`` is zero-padded
    to a multiple of ``int8_kernels.K_MULTIPLE``."""
    from slimc.backends.tvm import int8_kernels
    from tvm import relax

    bb = importer.block_builder
    weight = importer.env[node.args[1]]
    n, k = _static_shape(weight)
    kind = _w8a8_kind(n)
    if kind == "generic":
        layout = TableLayout("tiles", tile_for(n))
    else:
        kp = -(-k // int8_kernels.K_MULTIPLE) * int8_kernels.K_MULTIPLE
        layout = TableLayout("dot", int8_kernels.lanes(kind), int8_kernels.group(kind),
                             width=kp if kp != k else 0)

    def make():
        padded = weight
        if layout.width:
            padded = bb.emit(relax.op.nn.pad(weight, [0, 0, 0, layout.width - k]))
        return pack_int8(bb, kind, padded, n, layout.width or k)

    return layout, packed_once(importer, node, "w8a8", make)


def pack_int8(bb, kind: str, weight, n: int, k: int):
    """``weight [n, k]`` int8 in the ``kind`` kernel's layout (a relayout, folded at build
    time): generic ``[n/t, k, t]`` tiles, dot-product kinds ``[n/lanes, k/g, lanes, g]``."""
    from slimc.backends.tvm import int8_kernels
    from tvm import relax

    if kind == "generic":
        return _tiles(bb, weight, tile_for(n))
    lanes, g = int8_kernels.lanes(kind), int8_kernels.group(kind)
    tiles = bb.emit(relax.op.reshape(weight, (n // lanes, lanes, k // g, g)))
    return bb.emit(relax.op.permute_dims(tiles, [0, 2, 1, 3]))


def quantize_codes(bb, x, in_mult, zero_point: int, kind: str):
    """Static int8 codes of ``x`` as the ``kind`` kernel reads them: ``clamp(round(x *
    in_mult) + zero_point, -128, 127)`` plus the kernel's activation offset, in its dtype
    (elementwise Relax ops, fused into one kernel; ``in_mult`` broadcasts on the last axis)."""
    from slimc.backends.tvm import int8_kernels
    from tvm import relax

    codes = bb.emit(relax.op.round(relax.op.multiply(x, in_mult)))
    if zero_point:
        codes = bb.emit(relax.op.add(codes, relax.const(float(zero_point), "float32")))
    codes = bb.emit(relax.op.clip(codes, -128, 127))
    offset = int8_kernels.activation_offset(kind)
    if offset:
        codes = bb.emit(relax.op.add(codes, relax.const(float(offset), "float32")))
    return bb.emit(relax.op.astype(codes, int8_kernels.activation_dtype(kind)))


def int8_matmul(bb, kind: str, codes, weight, out_scale, bias, zero_point: int, m: int | Any,
                k: int, n: int, packed=None, row_scale=None):
    """``y[m, n] = (sum_k (a - zp) w) * out_scale + bias`` on the ``kind`` kernel (shared by
    the W8A8 linears and convolutions); ``row_scale [m]``: also times each row's own scale
    (dynamic per-token activations, :func:`quantize_row_codes`).

    ``codes [m, k]``: from :func:`quantize_codes` (offset included); ``weight [n, k']`` int8
    (``k' <= k``: columns past it are zero); ``packed``: the weight already in the kernel's
    layout (:func:`pack_int8` of ``weight`` zero-padded to ``k``), else packed here (then
    ``k' == k``); the dot-product kinds need ``k`` a multiple of ``int8_kernels.K_MULTIPLE``
    and ``n`` a multiple of their lanes; AVX2 reads the codes as int16.
    """
    import numpy as np
    from slimc.backends.tvm import int8_kernels
    from tvm import relax

    # sum_k (a + c) w = sum_k a w + c sum_k w, c = zero point (+ VNNI's unsigned offset):
    # take it back out in integers (in float it would cancel catastrophically).
    shift = zero_point + int8_kernels.activation_offset(kind)
    comp = relax.const(np.zeros(n, np.int32))
    if shift:
        comp = bb.emit(relax.op.multiply(
            relax.op.sum(relax.op.astype(weight, "int32"), axis=[1]),
            relax.const(shift, "int32")))
    if packed is None:
        packed = pack_int8(bb, kind, weight, n, k)
    scaled = row_scale is not None
    if kind == "generic":
        func = int8_kernels.generic_kernel(kernel_rows(m), k, n, tile_for(n), row_scaled=scaled)
    else:
        func = int8_kernels.dot_kernel(kind, kernel_rows(m), k, n, row_scaled=scaled)
    if bias is None:
        bias = relax.const(np.zeros(n, np.float32))
    gvar = add_kernel(bb, func)
    if kind != "generic" and not isinstance(m, int):
        return _dot_symbolic_rows(bb, gvar, codes, [packed, comp, out_scale, bias], m, k, n,
                                  row_scale)
    rows = [row_scale] if scaled else []
    return bb.emit(relax.call_tir(gvar, [codes, packed, comp, out_scale, bias, *rows],
                                  relax.TensorType((m, n), "float32")))


def _dot_symbolic_rows(bb, gvar, codes, operands, m, k: int, n: int, row_scale=None):
    """Call a symbolic-row dot kernel (``a[q, ROWS, k]``, see ``int8_kernels.dot_kernel``):
    zero rows pad the ``m`` codes to ``q * ROWS`` (``q = ceil(m / ROWS)``), the extra output
    rows are sliced off. Why padding rather than a tail kernel: the padded rows cost at most
    ``ROWS - 1`` rows of register-block work and one copy of the (int8/int16) codes, and the
    row loop of the kernel stays the fixed register block the instructions are tensorized on."""
    from slimc.backends.tvm import int8_kernels
    from tvm import relax, tirx

    rows = int8_kernels.ROWS
    m = tirx.IntImm("int64", m) if isinstance(m, int) else m
    q = tirx.floordiv(m + rows - 1, rows)
    dtype = codes.ty.dtype if hasattr(codes.ty, "dtype") else codes.struct_info.dtype
    pad = bb.emit(relax.op.zeros(relax.ShapeExpr([q * rows - m, k]), dtype))
    padded = bb.emit(relax.op.concat([codes, pad], axis=0))
    blocks = bb.emit(relax.op.reshape(padded, (q, rows, k)))
    if row_scale is not None:  # padded rows: scale 0 (their codes are 0 anyway)
        zeros = bb.emit(relax.op.zeros(relax.ShapeExpr([q * rows - m]), "float32"))
        operands = [*operands, bb.emit(relax.op.reshape(
            relax.op.concat([row_scale, zeros], axis=0), (q, rows)))]
    y = bb.emit(relax.call_tir(gvar, [blocks, *operands],
                               relax.TensorType((q, rows, n), "float32")))
    y = bb.emit(relax.op.reshape(y, (q * rows, n)))
    return bb.emit(relax.op.strided_slice(y, axes=[0], begin=[0], end=[m]))


def _convert_embedding(kind: str):
    def convert(node, importer):
        from tvm import relax

        bb = importer.block_builder
        table = importer.env[node.args[0]]
        vocab, width = _static_shape(table)
        if kind == "int8":
            ids_node, dim, group, extra = node.args[2], width, 0, [importer.env[node.args[1]]]
            zdtype = "uint8"
        else:
            ids_node, group = node.args[3], int(node.args[4])
            scale = importer.env[node.args[1]]
            dim = embedding_int4_dim(width, _static_shape(scale)[1], group)
            extra = [scale, importer.env[node.args[2]]]
            zdtype = zero_dtype_of(extra[1])
        layout, table, extra = _tied_operands(importer, node, kind, dim, table, extra)
        ids = importer.env[ids_node]
        ids_shape = list(ids.ty.shape)
        rows = 1
        for d in ids_shape:
            rows = rows * (int(d.value) if hasattr(d, "value") else d)
        flat = bb.emit(relax.op.reshape(relax.op.astype(ids, "int64"), (rows,)))
        func = embedding_kernel(kind, kernel_rows(rows), vocab, dim, group, zdtype, layout)
        gvar = add_kernel(bb, func)
        out = bb.emit(relax.call_tir(gvar, [flat, table, *extra],
                                     relax.TensorType((rows, dim), "float32")))
        return bb.emit(relax.op.reshape(out, (*ids_shape, dim)))

    return convert


def _tied_operands(importer, node, kind: str, dim: int, table, grid: list):
    """``(layout, table, grid)`` the gather ``node`` of ``dim``-wide rows reads: the packed
    operands of the output head that shares its table (same codes and grid nodes; the head,
    later in the graph, is not converted yet), else the table as is."""
    codes = node.args[0]
    if kind == "int8":
        head = head_reading(codes, (OPS["linear_int8"], OPS["linear_w8a8"]))
        if head is None:
            return ROWS, table, grid
        if head.target is OPS["linear_w8a8"]:
            layout, packed = _w8a8_packed(importer, head)
            return layout, packed, grid
        if head.args[2] is node.args[1]:  # the same per-row scales
            layout, packed = _int8_tiles(importer, head)
            return layout, packed, grid
        return ROWS, table, grid
    head = head_reading(codes, (OPS["linear_int4"],))
    if head is None or head.args[2] is not node.args[1] or head.args[3] is not node.args[2] \
            or int(head.args[6]) != int(node.args[4]):
        return ROWS, table, grid
    if _coded_operands(importer, head, dim, int(head.args[6])) is not None:
        return ROWS, table, grid
    layout, (packed, scale, zero) = _int4_tiles(importer, head, dim)
    return layout, packed, [scale, zero]


def register_cpu_lowerings() -> None:
    """Register this module's kernels as the ``llvm`` lowering of every slimc op."""
    table = {f"linear_{kind}": _convert_linear(kind) for kind in ("int8", "int4", "fp16", "bf16")}
    table.update({f"embedding_{kind}": _convert_embedding(kind) for kind in ("int8", "int4")})
    table["linear_w8a8"] = _convert_w8a8
    for name, fn in table.items():
        register_lowering(name, "llvm", fn)


register_cpu_lowerings()


def converters() -> dict[str, Any]:
    """Converters keyed like TVM's ``custom_convert_map``, dispatching per target kind."""
    from slimc.dialect import converters as dialect_converters

    return dialect_converters()


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
