"""GPU lowerings of slimc's quantized ops (registered for every target with the ``gpu`` key).

Each op becomes one ``R.call_tir`` of an *unscheduled* TE PrimFunc with two stages: a decode
block that turns the packed weight into float (int8 x scale; int4 nibble - zero, x group scale;
fp16/bf16 cast) and the matmul/gather that reads it. dlight's GPU rules (GEMV for decode-shaped
``m``, Matmul otherwise, Fallback for gathers) inline the decode into the consumer, so the
weight stays packed in GPU memory and is dequantized in registers (no fp32 copy of it ever
exists; ``FoldConstant`` cannot fold a call whose activation input is not constant).
Under ``precision=fp16|bf16`` (see ``mixed_precision.py``) the activation arrives in fp16/bf16,
the decode block dequantizes the weight to fp16/bf16 (scale applied in fp32, then rounded), and
the matmul multiplies fp16/bf16 operands into an fp32 accumulator (dlight's Matmul rule uses
tensor cores for that pattern on sm_70+); the output is fp32. With ``fp32`` the arithmetic is
fp32 throughout (W8A8: int8 x int8 into int32 either way).
"""

from __future__ import annotations

import functools

from slimc.dialect import register_lowering


def _shape(expr) -> tuple[int, ...]:
    from slimc.backends.tvm.quantized_ops import _static_shape

    return _static_shape(expr)


def _arg(importer, node, index: int):
    value = node.args[index] if index < len(node.args) else None
    return None if value is None else importer.env[value]


@functools.lru_cache(maxsize=256)
def linear_func(kind: str, m: int, k: int, n: int, group: int = 0, groups: int = 0,
                zero_dtype: str = "uint8", dtype: str = "float32"):
    """``y[m, n] = sum_k x[m, k] * decode(w)[n, k]`` for weight format ``kind``: ``x`` and the
    decoded weight in ``dtype``, products summed in fp32."""
    from slimc.backends.tvm.quantized_ops import int4_value, scale_dtype
    from tvm import te, tirx

    x = te.placeholder((m, k), dtype, name="x")
    if kind == "int8":
        w = te.placeholder((n, k), "int8", name="w")
        scale = te.placeholder((n,), "float32", name="scale")
        inputs = [x, w, scale]
        decoded = te.compute((n, k), lambda i, j: (w[i, j].astype("float32") * scale[i])
                             .astype(dtype), name="decode")
    elif kind == "int4":
        w = te.placeholder((n, (k + 1) // 2), "uint8", name="w")
        scale = te.placeholder((n, groups), scale_dtype(zero_dtype), name="scale")
        zero = te.placeholder((n, groups), zero_dtype, name="zero")
        inputs = [x, w, scale, zero]

        def decode(i, j):
            byte = w[i, j // 2]
            code = tirx.bitwise_and(tirx.shift_right(byte, ((j % 2) * 4).astype("uint8")),
                                    tirx.const(15, "uint8"))
            g = j // group
            return int4_value(code, scale[i, g], zero[i, g], zero_dtype).astype(dtype)

        decoded = te.compute((n, k), decode, name="decode")
    else:  # fp16 / bf16 storage
        w = te.placeholder((n, k), "float16" if kind == "fp16" else "bfloat16", name="w")
        inputs = [x, w]
        decoded = te.compute((n, k), lambda i, j: w[i, j].astype(dtype), name="decode")
    r = te.reduce_axis((0, k), name="r")
    y = te.compute((m, n), lambda i, j: te.sum(
        x[i, r].astype("float32") * decoded[j, r].astype("float32"), axis=r), name="y")
    return te.create_prim_func([*inputs, y]).with_attr("global_symbol", f"gpu_linear_{kind}")


@functools.lru_cache(maxsize=64)
def w8a8_func(m: int, k: int, n: int):
    """``y = (sum_k (a - zp) w) * out_scale + bias`` with int8 codes and int32 accumulation."""
    from tvm import te

    a = te.placeholder((m, k), "int8", name="a")
    w = te.placeholder((n, k), "int8", name="w")
    zp = te.placeholder((1,), "int32", name="zp")
    out_scale = te.placeholder((n,), "float32", name="out_scale")
    bias = te.placeholder((n,), "float32", name="bias")
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute((m, n), lambda i, j: te.sum(
        (a[i, r].astype("int32") - zp[0]) * w[j, r].astype("int32"), axis=r), name="acc")
    y = te.compute((m, n), lambda i, j: acc[i, j].astype("float32") * out_scale[j] + bias[j],
                   name="y")
    return te.create_prim_func([a, w, zp, out_scale, bias, y]).with_attr(
        "global_symbol", "gpu_linear_w8a8")


@functools.lru_cache(maxsize=64)
def embedding_func(kind: str, rows: int, vocab: int, dim: int, group: int = 0,
                   width: int = 0, groups: int = 0, zero_dtype: str = "uint8"):
    from slimc.backends.tvm.quantized_ops import int4_value, scale_dtype
    from tvm import te, tirx

    ids = te.placeholder((rows,), "int64", name="ids")
    if kind == "int8":
        w = te.placeholder((vocab, dim), "int8", name="w")
        scale = te.placeholder((vocab,), "float32", name="scale")
        inputs = [ids, w, scale]
        out = te.compute((rows, dim), lambda i, j: w[ids[i], j].astype("float32")
                         * scale[ids[i]], name="out")
    else:
        w = te.placeholder((vocab, width), "uint8", name="w")
        scale = te.placeholder((vocab, groups), scale_dtype(zero_dtype), name="scale")
        zero = te.placeholder((vocab, groups), zero_dtype, name="zero")
        inputs = [ids, w, scale, zero]

        def gather(i, j):
            row = ids[i]
            code = tirx.bitwise_and(tirx.shift_right(w[row, j // 2],
                                                     ((j % 2) * 4).astype("uint8")),
                                    tirx.const(15, "uint8"))
            g = j // group
            return int4_value(code, scale[row, g], zero[row, g], zero_dtype)

        out = te.compute((rows, dim), gather, name="out")
    return te.create_prim_func([*inputs, out]).with_attr("global_symbol",
                                                         f"gpu_embedding_{kind}")


def _add(bb, func):
    from slimc.backends.tvm.quantized_ops import add_kernel

    return add_kernel(bb, func)


def _convert_linear(kind: str):
    def convert(node, importer):
        from slimc.backends.tvm.mixed_precision import compute_dtype
        from tvm import relax

        bb = importer.block_builder
        x = importer.env[node.args[0]]
        dtype = compute_dtype()
        shape = _shape(x)
        k = shape[-1]
        m = 1
        for d in shape[:-1]:
            m *= d
        weight = importer.env[node.args[1]]
        n = _shape(weight)[0]
        if kind == "int8":
            bias, act = _arg(importer, node, 3), _arg(importer, node, 4)
            tensors = [weight, importer.env[node.args[2]]]
            func = linear_func("int8", m, k, n, dtype=dtype)
        elif kind == "int4":
            bias, act = _arg(importer, node, 4), _arg(importer, node, 5)
            scale, zero = importer.env[node.args[2]], importer.env[node.args[3]]
            group = int(node.args[6])
            tensors = [weight, scale, zero]
            func = linear_func("int4", m, k, n, group, _shape(scale)[1], str(zero.ty.dtype),
                               dtype=dtype)
        else:
            bias, act = _arg(importer, node, 2), None
            tensors = [weight]
            func = linear_func(kind, m, k, n, dtype=dtype)
        if act is not None:
            x = bb.emit(relax.op.multiply(x, act))
        x2 = bb.emit(relax.op.reshape(x, (m, k)))
        if dtype != "float32":
            x2 = bb.emit(relax.op.astype(x2, dtype))
        y = bb.emit(relax.call_tir(_add(bb, func), [x2, *tensors],
                                   relax.TensorType((m, n), "float32")))
        y = bb.emit(relax.op.reshape(y, (*shape[:-1], n)))
        if bias is not None:
            y = bb.emit(relax.op.add(y, bias))
        return y

    return convert


def _convert_w8a8(node, importer):
    import numpy as np
    from tvm import relax

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    weight = importer.env[node.args[1]]
    in_mult, out_scale = importer.env[node.args[2]], importer.env[node.args[3]]
    bias = _arg(importer, node, 4)
    zero_point = int(node.args[5])
    if len(node.args) > 6 and node.args[6]:
        from slimc.errors import LoweringError

        raise LoweringError("W8A8 with per-row (dynamic) activation scales has CPU kernels "
                            "only; this build targets a GPU.",
                            hint="Quantize for the GPU target itself (`quantize` then uses "
                            "static activation scales there), or build for a CPU target.")
    shape = _shape(x)
    k, n = shape[-1], _shape(weight)[0]
    m = int(np.prod(shape[:-1], dtype=np.int64))
    codes = bb.emit(relax.op.round(relax.op.multiply(relax.op.reshape(x, (m, k)), in_mult)))
    if zero_point:
        codes = bb.emit(relax.op.add(codes, relax.const(float(zero_point), "float32")))
    codes = bb.emit(relax.op.astype(relax.op.clip(codes, -128, 127), "int8"))
    if bias is None:
        bias = relax.const(np.zeros(n, np.float32))
    zp = relax.const(np.array([zero_point], np.int32))
    y = bb.emit(relax.call_tir(_add(bb, w8a8_func(m, k, n)),
                               [codes, weight, zp, out_scale, bias],
                               relax.TensorType((m, n), "float32")))
    return bb.emit(relax.op.reshape(y, (*shape[:-1], n)))


def _convert_embedding(kind: str):
    def convert(node, importer):
        from tvm import relax

        from slimc.dialect import embedding_int4_dim

        bb = importer.block_builder
        table = importer.env[node.args[0]]
        vocab, width = _shape(table)
        if kind == "int8":
            ids_node, extra = node.args[2], [importer.env[node.args[1]]]
            func_args = dict(dim=width)
        else:
            ids_node, group = node.args[3], int(node.args[4])
            scale = importer.env[node.args[1]]
            groups = _shape(scale)[1]
            dim = embedding_int4_dim(width, groups, group)
            extra = [scale, importer.env[node.args[2]]]
            func_args = dict(dim=dim, group=group, width=width, groups=groups,
                             zero_dtype=str(extra[1].ty.dtype))
        ids = importer.env[ids_node]
        ids_shape = _shape(ids)
        rows = 1
        for d in ids_shape:
            rows *= d
        flat = bb.emit(relax.op.reshape(relax.op.astype(ids, "int64"), (rows,)))
        func = embedding_func(kind, rows, vocab, **func_args)
        dim = func_args["dim"]
        out = bb.emit(relax.call_tir(_add(bb, func), [flat, table, *extra],
                                     relax.TensorType((rows, dim), "float32")))
        return bb.emit(relax.op.reshape(out, (*ids_shape, dim)))

    return convert


def register_gpu_lowerings() -> None:
    for kind in ("int8", "int4", "fp16", "bf16"):
        register_lowering(f"linear_{kind}", "gpu", _convert_linear(kind))
    for kind in ("int8", "int4"):
        register_lowering(f"embedding_{kind}", "gpu", _convert_embedding(kind))
    register_lowering("linear_w8a8", "gpu", _convert_w8a8)


register_gpu_lowerings()
