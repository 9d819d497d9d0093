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
from tvm import relax
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


@expr_functor.mutator
class _CancelTransposes(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        outer = _axes(call)
        if outer is None or not isinstance(call.args[0], relax.Var):
            return call
        inner_call = self.lookup_binding(call.args[0])
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


@tvm.transform.module_pass(opt_level=0, name="SlimcCancelTransposes")
def cancel_transposes(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``permute_dims(permute_dims(x, a), b)`` as one transpose, or ``x`` when they cancel.

    ``ConvertLayout`` leaves such pairs (NHWC -> NCHW -> NHWC) at some boundaries between the
    ops it converts; each would otherwise be a copy kernel over a whole activation.
    """
    return relax.transform.DeadCodeElimination()(
        mutate_relax_functions(mod, _CancelTransposes(mod)))
