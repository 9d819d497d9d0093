"""CPU kernels of slimc's weight-only quantized convolutions (ops: ``slimc.dialect_conv``).

Same design as the quantized linears (``quantized_ops``): the IR carries opaque ops whose
operands are the packed weights the artifact stores, and each converter lowers one op to an
``R.call_tir`` of a hand-scheduled TIR kernel that dequantizes *inside* the convolution's
reduction loop, so ``FoldConstant`` never sees a ``dequantize(constant)`` it could fold back
into an fp32 weight.

The weight is stored as its matrix ``[O, R]``, ``R = I/groups * prod(kernel)`` (each output
channel's reduction axis flattened in ``(channel, *kernel)`` order): per output channel int8
codes, or int4 codes with one scale and zero point per group of ``group_size`` along ``R``
(the linear packing, reused). That covers regular, depthwise (``I/groups = 1``), pointwise
(1x1) and grouped convolutions, 1-D (audio front ends; run as 2-D with height 1) and 2-D.

* ``conv_int8(x, qweight int8[O,R], scale f32[O], bias?, kernel, stride, padding, dilation,
  groups)``
* ``conv_int4(x, packed uint8[O,ceil(R/2)], scale f32[O,G], zero uint8[O,G], bias?, kernel,
  stride, padding, dilation, groups, group_size)``

``padding`` is explicit, ``[before, after]`` per spatial axis (``padding='same'`` of an even
kernel is asymmetric), and is applied to ``x`` by a Relax ``pad`` before the kernel.

Why not the Winograd path: Winograd transforms the weight into a float tile domain at build
time (``schedules/winograd.py``), which would store fp32 (or 16/9 as many) transformed weights
and undo the compression; quantized 3x3 convolutions take this direct kernel instead, and
Winograd stays for unquantized ones.
"""

from __future__ import annotations

import functools
from typing import Any

from slimc.backends.tvm.quantized_ops import (
    _arg,
    _finish,
    _static_shape,
    add_kernel,
    int4_value,
    scale_dtype,
    zero_dtype_of,
)

from slimc.dialect import register_lowering
from slimc.dialect_conv import OPS, conv_int4, conv_int8, conv_output_shape  # noqa: F401

# ---------------------------------------------------------------------------------------------
# TIR kernel
# ---------------------------------------------------------------------------------------------

#: Output columns computed together in vector lanes (the largest that divides the width).
LANES = (16, 8, 4, 2)


@functools.lru_cache(maxsize=256)
def conv_kernel(kind: str, x_shape: tuple[int, int, int, int], out_channels: int,
                kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
                groups: int, group: int = 0, zero_dtype: str = "uint8"):
    """``(x_padded[N,C,H,W], weight..., y[N,O,Ho,Wo])`` with the dequantization in the loop.

    Parallel over (image, output channel, output row); each row's output columns are
    accumulated in vector lanes in a local buffer while the reduction runs over
    (input channel, kernel row, kernel column); the int8 scale is applied once per output.
    """
    from tvm import te, tirx

    n, c, h, w = x_shape
    kh, kw = kernel
    cg, og = c // groups, out_channels // groups
    reduction = cg * kh * kw
    ho = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w - dilation[1] * (kw - 1) - 1) // stride[1] + 1

    def i64(*values: int):  # Relax's tensors have int64 shapes: FuseTIR needs them to match
        return tuple(tirx.IntImm("int64", v) for v in values)

    x = te.placeholder(i64(n, c, h, w), "float32", name="x")
    rc = te.reduce_axis(i64(0, cg), name="rc")
    ri = te.reduce_axis(i64(0, kh), name="ri")
    rj = te.reduce_axis(i64(0, kw), name="rj")
    if kind == "int8":
        wt = te.placeholder(i64(out_channels, reduction), "int8", name="w")
        s = te.placeholder(i64(out_channels), "float32", name="scale")
        params = [x, wt, s]

        def deq(o, r):
            return wt[o, r].astype("float32")
    else:
        groups_r = -(-reduction // group)
        wt = te.placeholder(i64(out_channels, (reduction + 1) // 2), "uint8", name="w")
        s = te.placeholder(i64(out_channels, groups_r), scale_dtype(zero_dtype), name="scale")
        z = te.placeholder(i64(out_channels, groups_r), zero_dtype, name="zero")
        params = [x, wt, s, z]

        def deq(o, r):
            byte = wt[o, r // 2]
            code = (byte >> ((r % 2) * 4).astype("uint8")) & tirx.const(15, "uint8")
            g = r // group
            return int4_value(code, s[o, g], z[o, g], zero_dtype)

    acc = te.compute(
        i64(n, out_channels, ho, wo),
        lambda b, o, i, j: te.sum(
            x[b, (o // og) * cg + rc, i * stride[0] + ri * dilation[0],
              j * stride[1] + rj * dilation[1]] * deq(o, (rc * kh + ri) * kw + rj),
            axis=[rc, ri, rj]), name="acc")
    if kind == "int8":
        y = te.compute(acc.shape, lambda b, o, i, j: acc[b, o, i, j] * s[o], name="y")
    else:
        y = te.compute(acc.shape, lambda b, o, i, j: acc[b, o, i, j], name="y")
    sch = schedule_direct_conv(te.create_prim_func([*params, y]), wo)
    name = (f"slimc_conv_{kind}_{n}x{c}x{h}x{w}_o{out_channels}_k{kh}x{kw}_s{stride[0]}x"
            f"{stride[1]}_d{dilation[0]}x{dilation[1]}_g{groups}" + (f"_q{group}" if group else ""))
    # Opaque to FuseOps: fusing the input's pad into it would drop this schedule (see
    # ``int8_conv.finish_opaque``).
    return _finish(sch.mod["main"], name).with_attr("op_pattern", 8)


def schedule_direct_conv(func, wo: int):
    """The direct-convolution schedule shared by the weight-only and the grouped W8A8 kernels:
    block ``acc[b, o, i, j]`` reduced over (c, kh, kw) and block ``y`` reading it; (b, o, i)
    fused and parallel, output columns split into vector lanes innermost, the accumulator
    local. Returns the schedule."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    block = sch.get_sblock("acc")
    b, o, i, j, lc, li, lj = sch.get_loops(block)
    lanes = next((v for v in LANES if wo % v == 0), 1)
    outer = sch.fuse(b, o, i)
    jo, ji = sch.split(j, [None, lanes])
    sch.reorder(outer, jo, lc, li, lj, ji)
    sch.parallel(outer)
    sch.reverse_compute_at(sch.get_sblock("y"), jo)
    sch.set_scope(block, 0, "local")
    if lanes > 1:
        sch.vectorize(ji)
        sch.vectorize(sch.get_loops(sch.get_sblock("y"))[-1])
    init = sch.decompose_reduction(block, lc)
    if lanes > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    return sch


# ---------------------------------------------------------------------------------------------
# Relax converters
# ---------------------------------------------------------------------------------------------


def _convert(kind: str):
    def convert(node, importer):
        from tvm import relax

        bb = importer.block_builder
        x = importer.env[node.args[0]]
        weight = importer.env[node.args[1]]
        if kind == "int8":
            extra, bias, rest = [importer.env[node.args[2]]], _arg(importer, node, 3), 4
        else:
            extra = [importer.env[node.args[2]], importer.env[node.args[3]]]
            bias, rest = _arg(importer, node, 4), 5
        kernel, stride, padding, dilation = (list(node.args[rest + i]) for i in range(4))
        groups = int(node.args[rest + 4])
        group = int(node.args[rest + 5]) if kind == "int4" else 0
        shape = _static_shape(x)
        out_channels = _static_shape(weight)[0]
        if len(kernel) == 1:  # conv1d: a 2-D convolution of height 1
            kernel, stride, dilation = [1, *kernel], [1, *stride], [1, *dilation]
            padding = [0, 0, *padding]
            x = bb.emit(relax.op.reshape(x, (shape[0], shape[1], 1, shape[2])))
        if any(padding):
            x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, *padding]))
        x_shape = _static_shape(x)
        func = conv_kernel(kind, x_shape, out_channels, tuple(kernel), tuple(stride),
                           tuple(dilation), groups, group,
                           zero_dtype_of(extra[1]) if kind == "int4" else "uint8")
        out = conv_output_shape(x_shape, out_channels, kernel, stride, [0] * 4, dilation)
        y = bb.emit(relax.call_tir(add_kernel(bb, func), [x, weight, *extra],
                                   relax.TensorType(out, "float32")))
        if bias is not None:
            y = bb.emit(relax.op.add(y, relax.op.reshape(bias, (1, out_channels, 1, 1))))
        if len(shape) == 3:
            y = bb.emit(relax.op.reshape(y, (out[0], out_channels, out[3])))
        return y

    return convert


def converters() -> dict[str, Any]:
    """This module's converters alone, keyed like TVM's ``custom_convert_map``."""
    return {OPS[f"conv_{kind}"].__name__: _convert(kind) for kind in ("int8", "int4")}


for _kind in ("int8", "int4"):
    register_lowering(f"conv_{_kind}", "llvm", _convert(_kind))
