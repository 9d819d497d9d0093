"""CPU kernels of the quantized mixture-of-experts gathers (ops: ``slimc.dialect_conv``).

transformers 5 stores a layer's experts as one 3-D parameter ``W[E, N, K]`` and, on slimc's
static ``batched_mm`` path, gathers ``W[expert_ids]`` (``[S, N, K]``, one slice per routed
token) before a batched matmul. slimc replaces that gather by one that reads packed codes and
dequantizes the gathered slices, per expert and per output row (int8), or per (expert, row,
group of ``group_size`` inputs) (int4): the artifact stores the experts at 8 or ~4.3 bits. The
batched matmul that follows is unchanged.

* ``expert_gather_int8(qweight int8[E,N,K], scale f32[E,N], ids, transposed)``
* ``expert_gather_int4(packed uint8[E,N,ceil(K/2)], scale f32[E,N,G], zero uint8[E,N,G], ids,
  group_size, transposed)``

``transposed``: the model stores ``W[E, K, N]`` (the gathered tensor is a right operand); the
codes are kept in the canonical ``[E, N, K]`` orientation and the gather returns ``[S, K, N]``.
"""

from __future__ import annotations

import functools
from typing import Any

from slimc.backends.tvm.quantized_ops import (
    _finish,
    _static_shape,
    _zero_suffix,
    add_kernel,
    int4_value,
    scale_dtype,
    zero_dtype_of,
)

from slimc.dialect import register_lowering
from slimc.dialect_conv import OPS, expert_k


@functools.lru_cache(maxsize=64)
def gather_kernel(kind: str, rows: int, experts: int, n: int, k: int, group: int,
                  transposed: bool, zero_dtype: str = "uint8"):
    """``(ids[rows], packed..., out[rows, n, k] or [rows, k, n])``, parallel over rows."""
    from tvm import s_tir, te, tirx

    def i64(*values: int):
        return tuple(tirx.IntImm("int64", v) for v in values)

    ids = te.placeholder(i64(rows), "int64", name="ids")
    if kind == "int8":
        w = te.placeholder(i64(experts, n, k), "int8", name="w")
        s = te.placeholder(i64(experts, n), "float32", name="scale")
        params = [ids, w, s]

        def value(r, j, kk):
            e = ids[r]
            return w[e, j, kk].astype("float32") * s[e, j]
    else:
        groups = -(-k // group)
        w = te.placeholder(i64(experts, n, (k + 1) // 2), "uint8", name="w")
        s = te.placeholder(i64(experts, n, groups), scale_dtype(zero_dtype), name="scale")
        z = te.placeholder(i64(experts, n, groups), zero_dtype, name="zero")
        params = [ids, w, s, z]

        def value(r, j, kk):
            e = ids[r]
            byte = w[e, j, kk // 2]
            code = (byte >> ((kk % 2) * 4).astype("uint8")) & tirx.const(15, "uint8")
            g = kk // group
            return int4_value(code, s[e, j, g], z[e, j, g], zero_dtype)

    if transposed:
        out = te.compute(i64(rows, k, n), lambda r, kk, j: value(r, j, kk), name="out")
    else:
        out = te.compute(i64(rows, n, k), value, name="out")
    sch = s_tir.Schedule(te.create_prim_func([*params, out]))
    loops = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(sch.fuse(loops[0], loops[1]))
    name = f"slimc_expert_gather_{kind}_{rows}x{experts}x{n}x{k}" + (
        f"_g{group}" if group else "") + ("_t" if transposed else "") + _zero_suffix(zero_dtype)
    return _finish(sch.mod["main"], name)


def _convert(kind: str):
    def convert(node, importer):
        from tvm import relax

        bb = importer.block_builder
        table = importer.env[node.args[0]]
        experts, n, width = _static_shape(table)
        if kind == "int8":
            extra, ids_node, group, k = [importer.env[node.args[1]]], node.args[2], 0, width
            transposed = bool(node.args[3])
        else:
            scale = importer.env[node.args[1]]
            ids_node, group = node.args[3], int(node.args[4])
            k = expert_k(width, _static_shape(scale)[-1], group)
            extra = [scale, importer.env[node.args[2]]]
            transposed = bool(node.args[5])
        ids = importer.env[ids_node]
        ids_shape = _static_shape(ids)
        rows = 1
        for d in ids_shape:
            rows *= d
        flat = bb.emit(relax.op.reshape(relax.op.astype(ids, "int64"), (rows,)))
        func = gather_kernel(kind, rows, experts, n, k, group, transposed,
                             zero_dtype_of(extra[1]) if kind == "int4" else "uint8")
        tail = (k, n) if transposed else (n, k)
        out = bb.emit(relax.call_tir(add_kernel(bb, func), [flat, table, *extra],
                                     relax.TensorType((rows, *tail), "float32")))
        return bb.emit(relax.op.reshape(out, (*ids_shape, *tail)))

    return convert


def converters() -> dict[str, Any]:
    """This module's converters alone, keyed like TVM's ``custom_convert_map``."""
    return {OPS[f"expert_gather_{kind}"].__name__: _convert(kind) for kind in ("int8", "int4")}


for _kind in ("int8", "int4"):
    register_lowering(f"expert_gather_{_kind}", "llvm", _convert(_kind))
