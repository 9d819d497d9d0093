"""CPU lowering of W8A8 convolutions (``slimc::conv_w8a8``, ops: ``slimc.dialect_conv``).

The W8A8 linears' machinery, reused rather than copied: the input is quantized by the same
fused elementwise ops (``quantized_ops.quantize_codes``) and multiplied by the same int8
kernels with the same zero-point compensation (``quantized_ops.int8_matmul``: VNNI
``vpdpbusd`` on x86 with AVX-512 VNNI, AVX2 ``vpmaddwd`` on other AVX2 x86 CPUs, ``sdot`` on
Armv8.2+, the generic int8 kernel elsewhere). What is new is only how a convolution becomes
that matmul:

* **Dense convolutions** (``groups == 1``: regular, pointwise, 1-D): the codes are written
  NHWC, channels padded to a multiple of 4 (a dot-product instruction reduces 4 bytes) and the
  borders padded with the zero point's code, so padding contributes exactly 0; an im2col kernel
  gathers the rows ``[N * Ho * Wo, kh * kw * C]`` (channel innermost: each kernel tap is one
  contiguous copy of ``C`` bytes). A 1x1, stride-1 convolution needs no im2col: its NHWC codes
  *are* the rows. The weight matrix is permuted to the same ``(kh, kw, C)`` column order, its
  output channels padded to the instruction's lanes (16 for VNNI, 8 for AVX2, 4 for sdot) with
  zero rows, all at build time (constant folding); the result is cropped and returned NCHW.
  For AVX2 the codes, their border fill and the im2col rows are int16 (the operand
  ``vpmaddwd`` reads; values still -128..127), and the producing layer's fused requantization
  writes them as int16 (measured against int8 codes widened in the kernel: docs/benchmarks.md).
  Depthwise and grouped convolutions keep int8 codes on every target.
* **Depthwise convolutions** (one input channel per output channel, MobileNets) take an NHWC
  integer kernel with the channels in the vector lanes and the padding read in place
  (:func:`depthwise_nhwc_kernel`). Its input transpose and every dense convolution's output
  transpose meet the neighbouring convolutions' and cancel
  (``schedules.nhwc_rewrites.sink_layout_transposes``): activations stay NHWC from conv to conv.
  A zero ``pad`` exported before a convolution (TF "same" padding) is folded into its padding.
* **Grouped convolutions** take a direct integer kernel (NCHW, int8 x int8 ->
  int32 in vector lanes over output columns, the float epilogue fused): a dot-product
  instruction reduces 4 consecutive inputs of *one* output channel, and a depthwise channel has
  only ``kh * kw`` of them (9 for 3x3): padded to 12 and broadcast across lanes, three quarters
  of each instruction would multiply padding or another channel's data. Depthwise layers are
  a few percent of a MobileNet's MACs, so the int path without dot products costs little.

Winograd: quantized convolutions never take the Winograd path (``schedules/winograd.py`` is for
fp32). Its transformed weights ``G g G^T`` are fractions (1/2, 1/4 entries) that int8 codes
cannot hold exactly, and its input transform grows the activation range 4x (F(2,3)) or more,
which costs 2+ bits of an 8-bit grid; integer Winograd schemes need wider (int16) tiles and
lose the exactness the tests check. The im2col + dot-product path does 9 MACs per output per
channel, but at 4x the throughput of fp32 FMAs (64 int8 MACs per ``vpdpbusd`` vs 16 fp32).
"""

from __future__ import annotations

import functools

from slimc.backends.tvm import epilogue as epi
from slimc.backends.tvm.int8_kernels import with_rebuild
from slimc.backends.tvm.quantized_conv import schedule_direct_conv
from slimc.backends.tvm.quantized_ops import (
    _arg,
    _finish,
    _static_shape,
    add_kernel,
    int8_matmul,
    quantize_codes,
)

from slimc.dialect import register_lowering
from slimc.dialect_conv import conv_output_shape

#: TVM's ``OpPatternKind::kOpaque``: FuseOps fuses nothing into a kernel marked so.
OPAQUE = 8


def finish_opaque(func, name: str):
    """:func:`quantized_ops._finish` plus ``op_pattern = kOpaque``.

    Without it ``FuseOps`` merges the quantizing elementwise ops into these kernels (they look
    injective / reductions to it): the quantization is then recomputed for every im2col
    element (9x for a 3x3), and the fused function loses this module's schedule (a depthwise
    layer of MobileNetV2 went from ~0.1 to 111 ms).
    """
    return _finish(func, name).with_attr("op_pattern", OPAQUE)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _i64(*values: int):
    """int64 shape dims: Relax's tensors have them, and FuseTIR may fuse the quantizing
    elementwise ops into these kernels, whose buffers must then match."""
    from tvm import tirx

    return tuple(tirx.IntImm("int64", v) for v in values)


@functools.lru_cache(maxsize=256)
def im2col_kernel(dtype: str, n: int, h: int, w: int, c: int, kernel: tuple[int, int],
                  stride: tuple[int, int], dilation: tuple[int, int], rows_to: int = 0,
                  fill: int = 0):
    """``(codes[N, H, W, C] (padded), rows[M, kh * kw * C])``: the convolution's input rows,
    channel innermost (one contiguous ``C``-byte copy per kernel tap); ``M = N * Ho * Wo``,
    or ``rows_to`` rows with the extra ones ``fill`` (so the dot kernel's row block fits)."""
    from tvm import s_tir, te, tirx

    kh, kw = kernel
    ho = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    codes = te.placeholder(_i64(n, h, w, c), dtype, name="codes")

    total = n * ho * wo

    def value(m, kk):
        b, rest = m // (ho * wo), m % (ho * wo)
        tap, ch = kk // c, kk % c
        b = tirx.min(b, n - 1)  # rows past the end (``rows_to``) read a valid pixel ...
        read = codes[b, (rest // wo) * stride[0] + (tap // kw) * dilation[0],
                     (rest % wo) * stride[1] + (tap % kw) * dilation[1], ch]
        if rows_to <= total:
            return read
        return tirx.if_then_else(m < total, read, tirx.const(fill, dtype))  # ... unused

    rows = te.compute(_i64(max(rows_to, total), kh * kw * c), value, name="rows")
    sch = s_tir.Schedule(te.create_prim_func([codes, rows]))
    m, kk = sch.get_loops(sch.get_sblock("rows"))
    sch.parallel(m)
    if c >= 16 or dilation[1] != 1:
        _, ch = sch.split(kk, [kh * kw, c])  # one contiguous C-byte copy per tap
        if c % 4 == 0:
            sch.vectorize(ch if c <= 64 else sch.split(ch, [None, 64])[1])
    else:  # few channels (an RGB stem): a kernel row's kw * C bytes are contiguous
        sch.split(kk, [kh, kw * c])
    name = (f"slimc_im2col_{dtype}_{n}x{h}x{w}x{c}_k{kh}x{kw}_s{stride[0]}x{stride[1]}"
            f"_d{dilation[0]}x{dilation[1]}" + (f"_m{rows_to}" if rows_to > total else ""))
    return finish_opaque(sch.mod["main"], name)


@functools.lru_cache(maxsize=256)
def pad_kernel(shape: tuple[int, int, int, int], padding: tuple[int, int, int, int],
               fill: int):
    """``(codes[N,C,H,W] int8, out[N,C,H+pt+pb,W+pl+pr])``, the border ``fill`` (the zero
    point's code), parallel over rows. Relax's ``pad`` of the last (W) axis ran ~40x slower
    under the generic fallback schedule (13 ms for a 96x112x112 MobileNetV2 map)."""
    from tvm import s_tir, te, tirx

    n, c, h, w = shape
    pt, pb, pl, pr = padding
    codes = te.placeholder(_i64(n, c, h, w), "int8", name="codes")
    out = te.compute(_i64(n, c, h + pt + pb, w + pl + pr), lambda b, ch, i, j: tirx.if_then_else(
        tirx.all(i >= pt, i < pt + h, j >= pl, j < pl + w),
        codes[b, ch, tirx.max(i - pt, 0), tirx.max(j - pl, 0)], tirx.const(fill, "int8")),
        name="out")
    sch = s_tir.Schedule(te.create_prim_func([codes, out]))
    b, ch, i, _ = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(sch.fuse(b, ch, i))
    return finish_opaque(sch.mod["main"], f"slimc_pad_int8_{n}x{c}x{h}x{w}_p{pt}_{pb}_{pl}_{pr}"
                         f"_f{fill}")


#: Output columns accumulated together in int32 vector lanes (the largest dividing the width).
LANES = (16, 8, 4, 2)


@functools.lru_cache(maxsize=256)
def grouped_kernel(x_shape: tuple[int, int, int, int], out_channels: int,
                   kernel: tuple[int, int], stride: tuple[int, int],
                   dilation: tuple[int, int], groups: int):
    """``(codes[N,C,H,W] int8 (padded), w[O,R] int8, comp[O] int32, scale[O], bias[O],
    y[N,O,Ho,Wo])``: ``y = float(sum a * w - comp) * scale + bias`` for grouped and depthwise
    convolutions, parallel over (image, output channel, output row), output columns in int32
    vector lanes."""
    from tvm import te

    n, c, h, w = x_shape
    kh, kw = kernel
    cg, og = c // groups, out_channels // groups
    ho = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    a = te.placeholder(_i64(n, c, h, w), "int8", name="a")
    wt = te.placeholder(_i64(out_channels, cg * kh * kw), "int8", name="w")
    comp = te.placeholder(_i64(out_channels), "int32", name="comp")
    scale = te.placeholder(_i64(out_channels), "float32", name="scale")
    bias = te.placeholder(_i64(out_channels), "float32", name="bias")
    rc = te.reduce_axis(_i64(0, cg), name="rc")
    ri = te.reduce_axis(_i64(0, kh), name="ri")
    rj = te.reduce_axis(_i64(0, kw), name="rj")
    acc = te.compute(
        _i64(n, out_channels, ho, wo),
        lambda b, o, i, j: te.sum(
            a[b, (o // og) * cg + rc, i * stride[0] + ri * dilation[0],
              j * stride[1] + rj * dilation[1]].astype("int32")
            * wt[o, (rc * kh + ri) * kw + rj].astype("int32"), axis=[rc, ri, rj]), name="acc")
    y = te.compute(acc.shape, lambda b, o, i, j: (acc[b, o, i, j] - comp[o]).astype("float32")
                   * scale[o] + bias[o], name="y")
    sch = schedule_direct_conv(te.create_prim_func([a, wt, comp, scale, bias, y]), wo)
    name = (f"slimc_conv_w8a8_grouped_{n}x{c}x{h}x{w}_o{out_channels}_k{kh}x{kw}_s{stride[0]}x"
            f"{stride[1]}_d{dilation[0]}x{dilation[1]}_g{groups}")
    return finish_opaque(sch.mod["main"], name)


@functools.lru_cache(maxsize=256)
def depthwise_nhwc_kernel(x_shape: tuple[int, int, int, int], kernel: tuple[int, int],
                          stride: tuple[int, int], dilation: tuple[int, int],
                          padding: tuple[int, int, int, int], fill: int, lanes: int,
                          epilogue: tuple = ()):
    """``(codes[N,H,W,C] int8, w[kh,kw,C] int8, comp[C] int32, scale[C], bias[C], *vectors,
    y[N,Ho,Wo,C])``: a depthwise convolution (one input channel per output channel) on NHWC
    codes, ``y = epilogue(float(sum a * w - comp) * scale + bias)`` (``epilogue``: the next
    layer's requantization, see :mod:`..epilogue`; none: float32 ``y``).

    Channels are the vector lanes (int32 accumulators, ``lanes`` of them): every kernel tap is
    one contiguous vector load of input and of weight, unlike column lanes, which need strided
    reads at stride 2 and predicated tails at widths 7, 14, 28. The border is read as ``fill``
    (the zero point's code) through a bounds test on the row and column alone (``padding``:
    top, bottom, left, right), so no padded copy of the input is written. Parallel over
    (image, output row).
    """
    from tvm import te, tirx

    n, h, w, c = x_shape
    kh, kw = kernel
    pt, pb, pl, pr = padding
    ho = (h + pt + pb - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + pl + pr - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    a = te.placeholder(_i64(n, h, w, c), "int8", name="a")
    wt = te.placeholder(_i64(kh, kw, c), "int8", name="w")
    comp = te.placeholder(_i64(c), "int32", name="comp")
    scale = te.placeholder(_i64(c), "float32", name="scale")
    bias = te.placeholder(_i64(c), "float32", name="bias")
    ri = te.reduce_axis(_i64(0, kh), name="ri")
    rj = te.reduce_axis(_i64(0, kw), name="rj")

    def tap(b, i, j, ch):
        row = i * stride[0] + ri * dilation[0] - pt
        col = j * stride[1] + rj * dilation[1] - pl
        inside = tirx.all(row >= 0, row < h, col >= 0, col < w)
        read = a[b, tirx.max(tirx.min(row, h - 1), 0), tirx.max(tirx.min(col, w - 1), 0), ch]
        return tirx.if_then_else(inside, read, tirx.const(fill, "int8")).astype("int32")

    acc = te.compute(_i64(n, ho, wo, c), lambda b, i, j, ch: te.sum(
        tap(b, i, j, ch) * wt[ri, rj, ch].astype("int32"), axis=[ri, rj]), name="acc")
    vectors = epi.placeholders(epilogue, _i64(c))
    y = te.compute(acc.shape, lambda b, i, j, ch: epi.apply((acc[b, i, j, ch] - comp[ch]).astype(
        "float32") * scale[ch] + bias[ch], ch, epilogue, vectors), name="y")
    from tvm import s_tir

    sch = s_tir.Schedule(te.create_prim_func([a, wt, comp, scale, bias, *vectors, y]))
    block = sch.get_sblock("acc")
    b, i, j, ch, li, lj = sch.get_loops(block)
    co, ci = sch.split(ch, [None, lanes])
    sch.reorder(co, li, lj, ci)
    sch.parallel(sch.fuse(b, i))
    sch.reverse_compute_at(sch.get_sblock("y"), co)
    sch.set_scope(block, 0, "local")
    sch.vectorize(ci)
    sch.vectorize(sch.get_loops(sch.get_sblock("y"))[-1])
    init = sch.decompose_reduction(block, li)
    sch.vectorize(sch.get_loops(init)[-1])
    name = (f"slimc_conv_w8a8_depthwise_nhwc_{n}x{h}x{w}x{c}_k{kh}x{kw}_s{stride[0]}x{stride[1]}"
            f"_d{dilation[0]}x{dilation[1]}_p{pt}_{pb}_{pl}_{pr}_f{fill}_v{lanes}"
            f"{epi.suffix(epilogue)}")
    func = finish_opaque(sch.mod["main"], name)
    return func if epilogue else with_rebuild(func, "depthwise_nhwc", x_shape, kernel, stride,
                                              dilation, padding, fill, lanes)


def _convert_conv_w8a8(node, importer):
    """``slimc::conv_w8a8`` -> quantize (+ im2col) + the int8 kernels (see the module doc)."""
    import numpy as np
    from slimc.backends.tvm import int8_kernels
    from tvm import relax
    from tvm.target import Target

    bb = importer.block_builder
    source, extra = _zero_padded_source(node.args[0])
    x = importer.env[source]
    weight, in_mult, out_scale = (importer.env[node.args[i]] for i in (1, 2, 3))
    bias = _arg(importer, node, 4)
    kernel, stride, padding, dilation = (list(node.args[5 + i]) for i in range(4))
    if extra is not None and len(kernel) == 2:
        padding = [p + e for p, e in zip(padding, extra, strict=True)]
    elif extra is not None:
        x = importer.env[node.args[0]]
    groups, zero_point = int(node.args[9]), int(node.args[10])
    shape = _static_shape(x)
    out_channels, reduction = _static_shape(weight)
    if len(kernel) == 1:  # conv1d: a 2-D convolution of height 1
        kernel, stride, dilation = [1, *kernel], [1, *stride], [1, *dilation]
        padding = [0, 0, *padding]
        x = bb.emit(relax.op.reshape(x, (shape[0], shape[1], 1, shape[2])))
    n, c, h, w = _static_shape(x)
    padded = (n, c, h + padding[0] + padding[1], w + padding[2] + padding[3])
    out = conv_output_shape(padded, out_channels, kernel, stride, [0] * 4, dilation)
    _, _, ho, wo = out
    if bias is None:
        bias = relax.const(np.zeros(out_channels, np.float32))
    target = Target.current(allow_none=True)
    kind = int8_kernels.kernel_kind(target)
    if groups == c == out_channels:
        y = _depthwise(bb, x, weight, in_mult, out_scale, bias, zero_point, (n, c, h, w),
                       padding, kernel, stride, dilation, target)
    elif groups > 1:
        per_channel = relax.op.reshape(in_mult, (1, c, 1, 1))
        codes = quantize_codes(bb, x, per_channel, zero_point, "generic")
        if any(padding):
            func = pad_kernel((n, c, h, w), tuple(padding), zero_point)
            codes = bb.emit(relax.call_tir(add_kernel(bb, func), [codes],
                                           relax.TensorType(padded, "int8")))
        comp = bb.emit(relax.op.multiply(relax.op.sum(relax.op.astype(weight, "int32"), axis=[1]),
                                         relax.const(zero_point, "int32")))
        func = grouped_kernel(padded, out_channels, tuple(kernel), tuple(stride),
                              tuple(dilation), groups)
        y = bb.emit(relax.call_tir(add_kernel(bb, func), [codes, weight, comp, out_scale, bias],
                                   relax.TensorType(out, "float32")))
    else:
        y = _dense(bb, kind, x, weight, out_scale, bias, zero_point, in_mult,
                   (n, c, h, w), padding, kernel, stride, dilation, (ho, wo), out_channels)
    if len(shape) == 3:
        y = bb.emit(relax.op.reshape(y, (n, out_channels, wo)))
    return y


def _zero_padded_source(arg):
    """``(x, [top, bottom, left, right])`` when ``arg`` is a zero ``pad`` of ``x``'s two last
    axes (TensorFlow "same" padding, exported before the conv), else ``(arg, None)``.

    Zero quantizes to the zero point's code, which is what the kernels read at the border, so
    the pad folds into the convolution's own padding: no padded fp32 copy of the activation,
    and no layout transpose around it (Relax's layout passes have no rule for ``pad``).
    """
    import torch

    pads = (torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default)
    if getattr(arg, "op", None) != "call_function" or arg.target not in pads:
        return arg, None
    args = list(arg.args) + [None] * 4
    widths = [int(v) for v in args[1]]
    if arg.target is torch.ops.aten.pad.default:
        mode = arg.kwargs.get("mode", args[2] or "constant")
        value = arg.kwargs.get("value", args[3])
    else:
        mode, value = "constant", arg.kwargs.get("value", args[2])
    if mode != "constant" or float(value or 0.0) != 0.0 or any(v < 0 for v in widths):
        return arg, None
    if len(widths) not in (2, 4) or any(widths[4:]):
        return arg, None
    left, right, top, bottom = [*widths, 0, 0][:4]
    return arg.args[0], [top, bottom, left, right]


def _depthwise(bb, x, weight, in_mult, out_scale, bias, zero_point, x_shape, padding, kernel,
               stride, dilation, target):
    """A depthwise convolution on NHWC int8 codes (:func:`depthwise_nhwc_kernel`), its output
    transposed back to NCHW: between two convolutions, the transposes cancel
    (``schedules.nhwc_rewrites.sink_layout_transposes``)."""
    from slimc.backends.tvm.schedules.common import vector_lanes
    from tvm import relax

    n, c, h, w = x_shape
    kh, kw = kernel
    codes = quantize_codes(bb, relax.op.permute_dims(x, [0, 2, 3, 1]), in_mult, zero_point,
                           "generic")
    taps = bb.emit(relax.op.permute_dims(relax.op.reshape(weight, (c, kh, kw)), [1, 2, 0]))
    comp = bb.emit(relax.op.multiply(relax.op.sum(relax.op.astype(weight, "int32"), axis=[1]),
                                     relax.const(zero_point, "int32")))
    lanes = vector_lanes(target, 32) if target is not None else 4
    func = depthwise_nhwc_kernel((n, h, w, c), tuple(kernel), tuple(stride), tuple(dilation),
                                 (padding[0], padding[1], padding[2], padding[3]), zero_point,
                                 lanes)
    ho = (h + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = bb.emit(relax.call_tir(add_kernel(bb, func), [codes, taps, comp, out_scale, bias],
                               relax.TensorType((n, ho, wo, c), "float32")))
    return bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))


def _dense(bb, kind, x, weight, out_scale, bias, zero_point, in_mult, x_shape, padding, kernel,
           stride, dilation, out_hw, out_channels):
    """A ``groups == 1`` convolution as one int8 matmul over its NHWC im2col rows."""
    from slimc.backends.tvm import int8_kernels
    from tvm import relax

    n, c, h, w = x_shape
    kh, kw = kernel
    ho, wo = out_hw
    dot = kind != "generic"
    cp = _round_up(c, 4) if dot else c
    op = _round_up(out_channels, int8_kernels.lanes(kind)) if dot else out_channels
    codes = quantize_codes(bb, relax.op.permute_dims(x, [0, 2, 3, 1]), in_mult, zero_point,
                           kind)
    fill = float(zero_point + int8_kernels.activation_offset(kind))  # the code of 0.0
    if any(padding) or cp != c:
        codes = bb.emit(relax.op.nn.pad(codes, [0, 0, padding[0], padding[1], padding[2],
                                                padding[3], 0, cp - c], pad_value=fill))
    m, k = n * ho * wo, kh * kw * cp
    # The dot kernels block ROWS rows: a row count they do not divide (7x7 = 49 pixels) would
    # fall back to single-row blocks at half the speed; compute a few padding rows instead.
    mp = _round_up(m, int8_kernels.ROWS) if dot else m
    pointwise = (kh, kw) == (1, 1) and tuple(stride) == (1, 1) and not any(padding)
    if pointwise:
        rows = relax.op.reshape(codes, (m, k))
        if mp != m:
            rows = relax.op.nn.pad(rows, [0, mp - m, 0, 0], pad_value=fill)
        rows = bb.emit(rows)
    else:
        hp, wp = h + padding[0] + padding[1], w + padding[2] + padding[3]
        dtype = int8_kernels.activation_dtype(kind)
        func = im2col_kernel(dtype, n, hp, wp, cp, (kh, kw), tuple(stride), tuple(dilation),
                             mp, int(fill))
        rows = bb.emit(relax.call_tir(add_kernel(bb, func), [codes],
                                      relax.TensorType((mp, k), dtype)))
    # The weight in the rows' column order (kh, kw, C), zero-padded to (op, k): build time.
    matrix = relax.op.permute_dims(relax.op.reshape(weight, (out_channels, c, kh, kw)),
                                   [0, 2, 3, 1])
    if cp != c or op != out_channels:
        matrix = relax.op.nn.pad(matrix, [0, op - out_channels, 0, 0, 0, 0, 0, cp - c])
        out_scale = relax.op.nn.pad(out_scale, [0, op - out_channels])
        bias = relax.op.nn.pad(bias, [0, op - out_channels])
    matrix = bb.emit(relax.op.reshape(matrix, (op, k)))
    out_scale, bias = bb.emit(out_scale), bb.emit(bias)
    y = int8_matmul(bb, kind, rows, matrix, out_scale, bias, zero_point, mp, k, op)
    if op != out_channels or mp != m:
        y = relax.op.strided_slice(y, [0, 1], [0, 0], [m, out_channels])
    y = relax.op.reshape(y, (n, ho, wo, out_channels))
    return bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))


register_lowering("conv_w8a8", "llvm", _convert_conv_w8a8)
