"""Graph rewrites that keep an NHWC network NHWC: no layout transforms around pads and clips.

Relax's ``ConvertLayout`` (which turns slimc's convs NHWC) has no layout rule for ``nn.pad``
and ``clip``; around each of them it puts the tensor back to NCHW and then NHWC again, two
full passes over the activations per op that the network never asked for. Both ops are
rewritten before ``ConvertLayout`` into ops it does handle.

**Zero padding folded into the conv.**
TensorFlow-style "same" padding (Hugging Face MobileNetV1/V2, EfficientNet ports with
``tf_padding``) is exported as ``pad(x, zeros)`` followed by a ``conv2d`` with no padding of
its own, and a 1x1 conv gets an all-zero ``pad`` in front of it. Relax's ``ConvertLayout`` has
no layout rule for ``nn.pad``, so in an NHWC network every such pad became
``transpose -> pad -> transpose``: three passes over the activations around each conv
(MobileNetV2: 8 of its 48 ms). A conv pads its input with zeros anyway (asymmetric padding
included: Relax's ``padding`` is ``(top, left, bottom, right)``), so this pass moves the pad's
spatial widths into the conv's ``padding`` and drops the pad; the conv rule reads the border
through an inlined pad as it always did. All-zero pads on their own are dropped too.

Only constant-mode zero pads of the spatial axes qualify; anything else is left alone.

**Clip as max/min.** ``clip(x, lo, hi)`` (ReLU6 in MobileNets, hard-swish/-sigmoid) becomes
``minimum(maximum(x, lo), hi)``: the same values, as broadcast binary ops, which
``ConvertLayout`` keeps NHWC and operator fusion still folds into the conv epilogue
(MobileNetV2: a ``transpose -> clip -> transpose`` kernel after each of its 35 ReLU6s).
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax import PyExprMutator, expr_functor

from .common import mutate_relax_functions


def _pad_widths(call: relax.Call) -> list[int] | None:
    """``[before0, after0, before1, after1, ...]`` of a constant-zero ``nn.pad``, else None."""
    if getattr(call.op, "name", None) != "relax.nn.pad":
        return None
    attrs = call.attrs
    if str(getattr(attrs, "pad_mode", "constant")) != "constant":
        return None
    value = getattr(attrs, "pad_value", 0.0)
    if value is None:
        value = 0.0
    try:
        if float(value) != 0.0:
            return None
        return [int(w) for w in attrs.pad_width]
    except (TypeError, ValueError):
        return None


@expr_functor.mutator
class _FoldPad(PyExprMutator):
    def _bound_pad(self, expr):
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
        if isinstance(value, relax.Call) and _pad_widths(value) is not None:
            return value
        return None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        name = getattr(call.op, "name", None)
        if name == "relax.clip":
            return _clip_as_max_min(call)
        if name == "relax.nn.pad":
            widths = _pad_widths(call)
            if widths is not None and not any(widths):
                return call.args[0]  # an all-zero pad is the identity
            return call
        if name != "relax.nn.conv2d":
            return call
        pad = self._bound_pad(call.args[0])
        if pad is None:
            return call
        widths = _pad_widths(pad)
        layout = str(call.attrs.data_layout)
        if len(widths) != 8 or len(layout) != 4 or any(w < 0 for w in widths):
            return call
        axis = {c: i for i, c in enumerate(layout)}
        if any(widths[2 * axis[c]] or widths[2 * axis[c] + 1] for c in "NC"):
            return call
        h, w = axis["H"], axis["W"]
        top, left, bottom, right = (int(p) for p in call.attrs.padding)
        padding = (top + widths[2 * h], left + widths[2 * w],
                   bottom + widths[2 * h + 1], right + widths[2 * w + 1])
        a = call.attrs
        return relax.op.nn.conv2d(
            pad.args[0], call.args[1], strides=a.strides, padding=padding,
            dilation=a.dilation, groups=a.groups, data_layout=a.data_layout,
            kernel_layout=a.kernel_layout, out_layout=a.out_layout,
            out_dtype=a.out_dtype if str(a.out_dtype) else None)


def _clip_as_max_min(call: relax.Call) -> relax.Expr:
    """``minimum(maximum(x, lo), hi)`` for a float ``clip`` with constant bounds, else ``call``."""
    import math

    x = call.args[0]
    ty = getattr(x, "ty", None)
    if not isinstance(ty, relax.TensorType) or not str(ty.dtype).startswith(("float", "bfloat")):
        return call
    bounds = []
    for arg in call.args[1:3]:
        value = getattr(arg, "value", None)
        value = getattr(value, "value", value)
        if not isinstance(value, (int, float)):
            return call
        bounds.append(float(value))
    lo, hi = bounds
    out = x
    if not math.isinf(lo):
        out = relax.op.maximum(out, relax.const(lo, str(ty.dtype)))
    if not math.isinf(hi):
        out = relax.op.minimum(out, relax.const(hi, str(ty.dtype)))
    return out


@tvm.transform.module_pass(opt_level=0, name="SlimcNhwcRewrites")
def nhwc_rewrites(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Fold constant-zero ``nn.pad`` into the ``conv2d`` reading it; ``clip`` as max/min."""
    return relax.transform.DeadCodeElimination()(mutate_relax_functions(mod, _FoldPad(mod)))


def _axes(call: relax.Call) -> list[int] | None:
    if getattr(call.op, "name", None) != "relax.permute_dims":
        return None
    ty = getattr(call.args[0], "ty", None)
    rank = len(ty.shape) if isinstance(ty, relax.TensorType) and ty.shape is not None else None
    if call.attrs.axes is None:
        return list(range(rank))[::-1] if rank is not None else None
    return [int(a) for a in call.attrs.axes]


def _compose(mutator, call: relax.Call) -> relax.Expr:
    """``permute_dims(permute_dims(x, a), b)`` as one transpose, or ``x`` when they cancel."""
    outer = _axes(call)
    if outer is None or not isinstance(call.args[0], relax.Var):
        return call
    inner_call = mutator.lookup_binding(call.args[0])
    if not isinstance(inner_call, relax.Call):
        return call
    inner = _axes(inner_call)
    if inner is None or len(inner) != len(outer):
        return call
    composed = [inner[a] for a in outer]
    source = inner_call.args[0]
    if composed == list(range(len(composed))):
        return source
    return relax.op.permute_dims(source, composed)


@expr_functor.mutator
class _CancelTransposes(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        return _compose(self, super().visit_call_(call))


@tvm.transform.module_pass(opt_level=0, name="SlimcCancelTransposes")
def cancel_transposes(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``permute_dims(permute_dims(x, a), b)`` as one transpose, or ``x`` when they cancel.

    ``ConvertLayout`` leaves such pairs (NHWC -> NCHW -> NHWC) at some boundaries between the
    ops it converts; each would otherwise be a copy kernel over a whole activation.
    """
    return relax.transform.DeadCodeElimination()(
        mutate_relax_functions(mod, _CancelTransposes(mod)))


@expr_functor.mutator
class _DropNoOpBroadcasts(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if getattr(call.op, "name", None) != "relax.broadcast_to":
            return call
        source, target = getattr(call.args[0], "ty", None), getattr(call, "ty", None)
        if not (isinstance(source, relax.TensorType) and isinstance(target, relax.TensorType)):
            return call
        if source.shape is None or target.shape is None or source.dtype != target.dtype:
            return call
        return call.args[0] if _same_shape(source.shape, target.shape) else call


def _same_shape(a, b) -> bool:
    """Dimension by dimension: equal constants or the same symbolic variable."""
    a, b = list(getattr(a, "values", a)), list(getattr(b, "values", b))
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, tirx.IntImm) and isinstance(y, tirx.IntImm):
            if int(x.value) != int(y.value):
                return False
        elif not x.same_as(y):
            return False
    return True


@tvm.transform.module_pass(opt_level=0, name="SlimcDropNoOpBroadcasts")
def drop_noop_broadcasts(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``broadcast_to(x, shape)`` where ``shape`` is ``x``'s own, as ``x``.

    ``torch.matmul`` over 4-D operands exports as ``expand`` + ``view`` + ``bmm``, and the
    frontend keeps each ``expand`` as a ``broadcast_to`` even when nothing is broadcast: a
    copy of the tensor, fused into a neighbouring kernel as one more block (MobileViT's
    attention softmax wrote its 4 x 4 x 256 x 256 probabilities twice). Dropped, the kernels
    around it are the ones a model without it gets.
    """
    return relax.transform.DeadCodeElimination()(
        mutate_relax_functions(mod, _DropNoOpBroadcasts(mod)))


#: Image layout transposes (NHWC -> NCHW and back) that :func:`sink_layout_transposes` moves.
LAYOUT_AXES = ((0, 3, 1, 2), (0, 2, 3, 1))
#: Ops that act on each element alone (operands broadcast): a transpose commutes with them.
ELEMENTWISE = frozenset(f"relax.{name}" for name in (
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "power", "round", "floor",
    "ceil", "clip", "astype", "negative", "abs", "exp", "sqrt", "rsqrt", "tanh", "sigmoid",
    "erf", "nn.relu", "nn.gelu", "nn.gelu_tanh", "nn.silu"))


def _is_tensor(expr) -> bool:
    return isinstance(getattr(expr, "ty", None), relax.TensorType)


@expr_functor.mutator
class _SinkTransposes(PyExprMutator):
    """``op(permute(x, p), c)`` -> ``permute(op(x, c'), p)`` for elementwise ``op``."""

    def _permute_of(self, expr):
        """``(x, axes)`` if ``expr`` is bound to a layout ``permute_dims(x, axes)``."""
        if not isinstance(expr, relax.Var):
            return None
        value = self.lookup_binding(expr)
        if not isinstance(value, relax.Call):
            return None
        axes = _axes(value)
        if axes is None or tuple(axes) not in LAYOUT_AXES:
            return None
        return value.args[0], tuple(axes)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        import numpy as np

        call = super().visit_call_(call)
        name = getattr(call.op, "name", None)
        if name == "relax.permute_dims":  # cancel pairs as they form, before sinking on
            return _compose(self, call)
        if name not in ELEMENTWISE:
            return call
        permuted = [self._permute_of(a) for a in call.args]
        axes = {p[1] for p in permuted if p is not None}
        if len(axes) != 1:
            return call
        (p,) = axes
        inverse = [p.index(i) for i in range(len(p))]
        args = []
        for arg, perm in zip(call.args, permuted, strict=True):
            if perm is not None:
                args.append(perm[0])
            elif isinstance(arg, tvm.ir.expr.Constant):
                value = arg.value.numpy()
                if value.size == 1:  # a scalar broadcasts the same in either layout
                    args.append(arg)
                    continue
                if value.ndim > len(p):
                    return call
                value = value.reshape((1,) * (len(p) - value.ndim) + value.shape)
                args.append(relax.const(np.ascontiguousarray(value.transpose(inverse)),
                                        str(value.dtype)))
            elif not _is_tensor(arg):  # a PrimValue / shape operand (clip's bounds)
                args.append(arg)
            else:  # another activation in the other layout: sinking would add a transpose
                return call
        inner = self.builder_.emit(relax.Call(call.op, args, call.attrs, call.ty_args))
        return relax.op.permute_dims(inner, list(p))


@tvm.transform.module_pass(opt_level=0, name="SlimcSinkLayoutTransposes")
def sink_layout_transposes(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Move NHWC<->NCHW transposes below the elementwise ops that follow them.

    A conv kernel that computes NHWC inside an NCHW graph (the W8A8 convolutions, which are
    lowered one op at a time, before any layout pass) ends in ``permute_dims(y, NHWC->NCHW)``,
    and the next one starts with ``permute_dims(x, NCHW->NHWC)``; between them sit the
    activation, the residual add and the input quantization, all elementwise. Sunk below
    them, the two transposes meet and :func:`cancel_transposes` removes both: the activations
    stay NHWC from conv to conv, and the layout changes only at the graph's edges. An op whose
    other operand is an activation in the other layout is left alone (sinking would add a
    transpose there); constant operands are transposed at build time.
    """
    return relax.transform.DeadCodeElimination()(
        mutate_relax_functions(mod, _SinkTransposes(mod)))


#: Output pixels from which a 1x1 conv to ``4 x odd`` channels (only a quarter-width panel
#: divides them) becomes a matmul: the rows that make padding its weight worth a per-call copy
#: (the matmul rule's ``CONSTANT_PAD_MIN_ROWS``).
QUARTER_PANEL_MIN_PIXELS = 64
#: Output pixels from which a 1x1 conv to ``8 x odd`` channels (24, 40, 72, 120, 184, 200:
#: only a half-vector panel divides them on AVX-512) becomes a matmul too, on targets whose
#: 16-lane FMAs run at full width (:func:`_half_panels_lose`); None: never.
HALF_PANEL_MIN_PIXELS: int | None = QUARTER_PANEL_MIN_PIXELS


#: AVX-512 CPUs (LLVM ``-mcpu`` names) that split each 512-bit FMA into two 256-bit halves, so
#: that an 8-lane panel loses them no throughput. Zen 4 does; Zen 5 (``znver5``, EPYC Turin) has
#: full-width 512-bit FMAs: there a 1 x 1 conv 240 -> 232 over 7 x 7 pixels took 27.9 us on
#: 8-lane panels against 16.1 us for 240 -> 240, and 144 -> 24 over 14 x 14 9.6 us against
#: 5.5 us for 144 -> 32 (``benchmarks/conv_variants.py``, 2 threads, session 25).
HALF_WIDTH_FMA_CPUS = ("znver4",)


def _pointwise_tail_conv(call: relax.Call) -> relax.Expr:
    """``matmul(x, reshape(w, [C, O]))`` for a 1x1, stride-1, unpadded, dense NHWC/HWIO conv
    whose output channels no vector panel divides (``O % 4``), or only a 4-lane one
    (``O % 8``, e.g. ShuffleNetV2's 116) over at least ``QUARTER_PANEL_MIN_PIXELS`` pixels,
    or, where that loses (:func:`_half_panels_lose`), only an 8-lane one (``O % 16 == 8``,
    MobileNets' 24 / 40 / 72 / 120) over at least ``HALF_PANEL_MIN_PIXELS``; else ``call``."""
    a = call.attrs
    if (str(a.data_layout) != "NHWC" or str(a.kernel_layout) != "HWIO" or a.groups != 1
            or str(a.out_layout) not in ("NHWC", "")
            or any(int(s) != 1 for s in a.strides) or any(int(d) != 1 for d in a.dilation)
            or any(int(p) for p in a.padding)):
        return call
    shape = getattr(getattr(call.args[1], "ty", None), "shape", None)
    if shape is None or len(shape) != 4 or not all(isinstance(d, tirx.IntImm) for d in shape):
        return call
    kh, kw, cin, cout = (int(d) for d in shape)
    # float32 only: 16 lanes of a 512-bit vector (int8 convs have kernels of their own)
    half = HALF_PANEL_MIN_PIXELS is not None and cout % 16 == 8 \
        and str(getattr(getattr(call.args[0], "ty", None), "dtype", "")) == "float32" \
        and _pixels(call.args[0]) >= HALF_PANEL_MIN_PIXELS and _half_panels_lose()
    if (kh, kw) != (1, 1) or cout % 8 == 0 and not half:
        return call
    if cout % 4 == 0 and _pixels(call.args[0]) < QUARTER_PANEL_MIN_PIXELS:
        return call
    weight = relax.op.reshape(call.args[1], (cin, cout))
    out_dtype = str(a.out_dtype) if str(a.out_dtype) else None
    return relax.op.matmul(call.args[0], weight, out_dtype=out_dtype)


def _half_panels_lose() -> bool:
    """Whether the current target runs an 8-lane float panel at half its FMA throughput: 16
    float lanes (AVX-512) executed at full width, i.e. any AVX-512 CPU but those of
    :data:`HALF_WIDTH_FMA_CPUS` (AMD's Zen 4), which split each 512-bit FMA into two 256-bit
    halves, so that there an 8-lane panel loses no throughput and padding 24 channels to 32
    would add a third more multiply-adds.

    Why: a 1x1 conv to 24 channels ran its 8-lane ``ymm`` micro-kernel on this Intel host
    (``rocketlake`` to LLVM, two 512-bit FMA ports) at 1.5x the time of the same conv as a
    matmul padded to 32 channels (MobileNetV2's 144 -> 24 over 56 x 56, alone, 2 threads).
    The schedules were tuned on znver4, where that panel cost nothing.
    """
    from tvm.target import Target, codegen

    from .common import vector_lanes

    target = Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm" or vector_lanes(target, 32) != 16:
        return False
    mcpu = str(target.attrs.get("mcpu", "") or "")
    if mcpu in ("", "@host"):
        mcpu = str(codegen.llvm_get_system_cpu())
    return mcpu not in HALF_WIDTH_FMA_CPUS


def _pixels(data: relax.Expr) -> int:
    """Pixels (``N x H x W``) of a static NHWC activation; 0 when any extent is symbolic."""
    shape = getattr(getattr(data, "ty", None), "shape", None)
    if shape is None or len(shape) != 4 or not all(isinstance(d, tirx.IntImm) for d in shape):
        return 0
    return int(shape[0]) * int(shape[1]) * int(shape[2])


@expr_functor.mutator
class _PointwiseTailConvs(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if getattr(call.op, "name", None) == "relax.nn.conv2d":
            return _pointwise_tail_conv(call)
        return call


@tvm.transform.module_pass(opt_level=0, name="SlimcPointwiseTailConvs")
def pointwise_tail_convs_as_matmul(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """A 1x1 conv to a channel count no vector panel divides (SegFormer's 150 ADE20k classes,
    a detection head's 255 outputs), or only a 4-lane one (ShuffleNetV2's 116 = 4 x 29, over
    enough pixels), as the matmul it is, over the NHWC pixels.

    Why: the conv rule splits its output channels into 16-lane vectors and predicates the
    last one, which TVM then runs scalar: the whole micro-kernel, every tile (SegFormer-B0's
    256 -> 150 classifier over 128 x 128 pixels was 34% of the model). As a matmul its
    constant weight's column tail is padded to whole panels instead
    (:data:`.cpu_matmul.CONSTANT_PAD_MIN_ROWS`), which a conv's window indexing does not
    allow. A 4-lane panel (``O % 8 == 4``) runs the conv at a quarter of AVX-512's width
    (ShuffleNetV2's 116-channel 1x1 convs over 14 x 14 pixels: 30% of the model, the whole
    model 2x ONNX Runtime); as a matmul the weight is padded to whole vectors (116 -> 128).
    An 8-lane panel (``O % 16 == 8``) is half of AVX-512's width: on cores with full-width
    512-bit FMAs those convs become matmuls too (24 -> 32, 40 -> 48, 72 -> 80 columns;
    :func:`_half_panels_lose`). Channel counts a 16-lane or wider panel divides (and 8-lane
    ones on AVX2 and on Zen 4) keep the conv rule (and its pointwise tuning).
    """
    return mutate_relax_functions(mod, _PointwiseTailConvs(mod))
