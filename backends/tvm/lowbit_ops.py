"""CPU (``llvm``: x86 and aarch64) lowerings of the int3 / int2 ops (``slimc.dialect_lowbit``).

The linear kernel is the factored int4 kernel's structure with another unpacking step:
``y[j] = sum_g scale[j,g] * sum_{k in g} x[k] * code[j,k] + minimum[j,g] * sum_{k in g} x[k]``.
The inner loop runs over 8-code chunks of a group (``B`` bytes each: every group starts on a
byte boundary), extracts each code with constant shifts and masks (a code that straddles two
bytes ORs the pieces), widens it to fp32 and multiplies-accumulates ``t`` output lanes in
registers. Scales and minima stay fp16 in the artifact and are widened in the kernel, once
per group. Same schedules as int4 (``quantized_ops._schedule_int4_grouped`` / row blocks).
"""

from __future__ import annotations

import functools

from slimc.backends.tvm.quantized_ops import (
    _arg,
    _finish,
    _rows_and_width,
    _schedule_int4_grouped,
    _schedule_int4_row_block,
    _static_shape,
    _tiles,
    add_kernel,
    index_dtype,
    int4_row_block,
    kernel_rows,
    row_var,
    tile_for,
)

from slimc.dialect import register_lowering
from slimc.lowbit import padded_k


def _code(read, bits: int, q: int):
    """Code ``q`` (0..7) of an 8-code chunk; ``read(p)`` is byte ``p`` of the chunk (uint8)."""
    from tvm import tirx

    mask = tirx.const((1 << bits) - 1, "uint8")
    offset = bits * q
    p, shift = offset // 8, offset % 8
    low = read(p) >> tirx.const(shift, "uint8") if shift else read(p)
    if shift + bits > 8:  # straddles into the next byte
        low = low | (read(p + 1) << tirx.const(8 - shift, "uint8"))
    return low & mask


@functools.lru_cache(maxsize=256)
def lowbit_linear_kernel(m: int | None, k: int, n: int, bits: int, group: int, t: int = 0):
    """``(x[m, K'], w[N/t, K'*B/8, t] u8, scale[N/t, G, t] f16, minimum f16, y[m, n])``."""
    from tvm import te

    t = t or tile_for(n, "int4")
    kp = padded_k(k, group)
    groups, chunks, per_group = kp // group, group // 8, group * bits // 8
    x = te.placeholder((row_var(m), kp), "float32", name="x")
    rows = x.shape[0]
    w = te.placeholder((n // t, kp * bits // 8, t), "uint8", name="w")
    s = te.placeholder((n // t, groups, t), "float16", name="scale")
    mn = te.placeholder((n // t, groups, t), "float16", name="minimum")
    r1 = te.reduce_axis((0, group), name="r1")
    xs = te.compute((rows, groups), lambda i, g: te.sum(x[i, g * group + r1], axis=r1), name="xs")
    rk = te.reduce_axis((0, chunks), name="rk")

    def chunk(i, j, g, c):
        def read(p):
            return w[j // t, g * per_group + c * bits + p, j % t]
        base = g * group + 8 * c
        total = x[i, base] * _code(read, bits, 0).astype("float32")
        for q in range(1, 8):
            total = total + x[i, base + q] * _code(read, bits, q).astype("float32")
        return total

    acc = te.compute((rows, n, groups), lambda i, j, g: te.sum(chunk(i, j, g, rk), axis=rk),
                     name="acc")
    rg = te.reduce_axis((0, groups), name="rg")
    y = te.compute((rows, n), lambda i, j: te.sum(
        s[j // t, rg, j % t].astype("float32") * acc[i, j, rg]
        + mn[j // t, rg, j % t].astype("float32") * xs[i, rg], axis=rg), name="y")
    func = te.create_prim_func([x, w, s, mn, y], index_dtype(m))
    name = f"slimc_linear_int{bits}_{m or 'dyn'}x{k}x{n}_g{group}"
    block = int4_row_block(m, t)
    if block > 1:
        return _finish(_schedule_int4_row_block(func, t, block), name + f"_r{block}")
    return _finish(_schedule_int4_grouped(func, t), name)


@functools.lru_cache(maxsize=64)
def lowbit_embedding_kernel(rows: int | None, vocab: int, dim: int, bits: int, group: int):
    """Gather ``rows`` ids from a bit-packed table and dequantize: ``(ids, w, scale, minimum,
    out[rows, dim])``; out-of-range ids read the nearest row, never memory past the table."""
    from tvm import s_tir, te, tirx

    width = padded_k(dim, group) * bits // 8
    groups = padded_k(dim, group) // group
    ids = te.placeholder((row_var(rows),), "int64", name="ids")
    w = te.placeholder((vocab, width), "uint8", name="w")
    s = te.placeholder((vocab, groups), "float16", name="scale")
    mn = te.placeholder((vocab, groups), "float16", name="minimum")

    def value(i, d):
        v = tirx.max(tirx.min(ids[i], tirx.const(vocab - 1, "int64")), tirx.const(0, "int64"))
        bit = d * bits
        p = bit // 8
        low = w[v, p].astype("uint16")
        high = w[v, tirx.min(p + 1, width - 1)].astype("uint16")
        word = low | (high << tirx.const(8, "uint16"))
        code = (word >> (bit % 8).astype("uint16")) & tirx.const((1 << bits) - 1, "uint16")
        g = d // group
        return code.astype("float32") * s[v, g].astype("float32") + mn[v, g].astype("float32")

    out = te.compute((ids.shape[0], dim), value, name="out")
    sch = s_tir.Schedule(te.create_prim_func([ids, w, s, mn, out], index_dtype(rows)))
    i, _ = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(i)
    name = f"slimc_embedding_int{bits}_{rows or 'dyn'}x{vocab}x{dim}_g{group}"
    return _finish(sch.mod["main"], name)


def _convert_linear(node, importer):
    from tvm import relax

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    weight = importer.env[node.args[1]]
    scale, minimum = importer.env[node.args[2]], importer.env[node.args[3]]
    bias, act = _arg(importer, node, 4), _arg(importer, node, 5)
    bits, group = int(node.args[6]), int(node.args[7])
    shape = list(x.ty.shape)
    m, k = _rows_and_width(x)
    n = _static_shape(weight)[0]
    t = tile_for(n, "int4")
    if act is not None:
        x = bb.emit(relax.op.multiply(x, act))
    x2 = bb.emit(relax.op.reshape(x, (m, k)))
    kp = padded_k(k, group)
    if kp != k:  # zero inputs for the padding codes
        x2 = bb.emit(relax.op.nn.pad(x2, [0, 0, 0, kp - k]))
    func = lowbit_linear_kernel(kernel_rows(m), k, n, bits, group, t)
    gvar = add_kernel(bb, func)
    y = bb.emit(relax.call_tir(gvar, [x2, _tiles(bb, weight, t), _tiles(bb, scale, t),
                                      _tiles(bb, minimum, t)],
                               relax.TensorType((m, n), "float32")))
    y = bb.emit(relax.op.reshape(y, (*shape[:-1], n)))
    if bias is not None:
        y = bb.emit(relax.op.add(y, bias))
    return y


def _convert_embedding(node, importer):
    from tvm import relax

    bb = importer.block_builder
    table, scale, minimum = (importer.env[node.args[i]] for i in range(3))
    ids = importer.env[node.args[3]]
    bits, group, dim = int(node.args[4]), int(node.args[5]), int(node.args[6])
    vocab = _static_shape(table)[0]
    ids_shape = list(ids.ty.shape)
    rows = 1
    for d in ids_shape:
        rows = rows * (int(d.value) if hasattr(d, "value") else d)
    flat = bb.emit(relax.op.reshape(relax.op.astype(ids, "int64"), (rows,)))
    gvar = add_kernel(bb, lowbit_embedding_kernel(kernel_rows(rows), vocab, dim, bits, group))
    out = bb.emit(relax.call_tir(gvar, [flat, table, scale, minimum],
                                 relax.TensorType((rows, dim), "float32")))
    return bb.emit(relax.op.reshape(out, (*ids_shape, dim)))


register_lowering("linear_lowbit", "llvm", _convert_linear)
register_lowering("embedding_lowbit", "llvm", _convert_embedding)
