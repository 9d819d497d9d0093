"""Dense convs whose output channels are not whole vectors compute padded ones, then slice.

The conv rule vectorizes a conv's output channels, so a channel count no full vector divides
runs narrower panels: ShuffleNetV2's 232-channel 1 x 1 convs over 7 x 7 pixels ran 8-lane
panels on AVX-512, 27.9 us against 16.1 us for the same conv to 240 channels and 13.5 us to 256
(Zen 5, 2 threads, ``benchmarks/conv_variants.py``, session 25). Over enough pixels such a 1 x 1
conv becomes a matmul whose weight the matmul rule pads (:mod:`.nhwc_rewrites`); over a 7 x 7
map there are too few rows for that, and a 3 x 3 conv is no single matmul.

So, in the graph: the conv gets zero output filters up to whole vectors, the elementwise
epilogue that follows it alone (bias, folded batch norm, activation: ops with constant or
scalar second operands) runs on the padded map with its constants padded, and one
``strided_slice`` after the epilogue gives every later reader the original channels. The
slice is an injective op, so operator fusion folds it into the consumer when that is a copy,
concatenation or elementwise op (ShuffleNetV2's channel shuffle); otherwise it is one copy of
the map, small beside the conv's work. Padded channels are ``f(0)`` of the epilogue -- finite
(only :data:`.channel_padding._ELEMENTWISE` ops, a divisor padded with ones), and whatever
they hold is sliced away before anything reads them.

Hidden maps of depthwise-separable blocks are padded without a slice by
:mod:`.channel_padding` (it runs first); what this pass sees is what that one left.

Linears (``x @ W`` with a constant ``W``) to such column counts get the same treatment. The
matmul rule can pad only per call (a weight copy each call, and only over 64+ rows); below
that its vector tail stays predicated, which makes the whole micro-kernel scalar: FocalNet's
modulation projections to ``2C + 3`` outputs (771, 1539 columns) ran at 10 GFLOP/s over 49
rows, 23 ms of FocalNet-T's 62 (session 27). Padded in the graph, the weight is padded and
packed once, at build time. A weight some other op also reads (a tied embedding table), or
that another function of the module reads (a generation artifact's decode step), is left alone:
padding it would store it twice.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

from .channel_padding import _ELEMENTWISE, _conv_kind, _dtype, _pad_axis, _shape, constant_value
from .common import mutate_relax_functions
from .tied_embedding import data_address

log = logging.getLogger("slimc.schedules")

#: Largest fraction of extra output channels the padding may add (232 -> 240: 3.4%; 24 -> 32,
#: a third more multiply-adds, is left to the matmul rule or to its narrower panel).
MAX_PAD_FRACTION = 0.125
#: Linears too (off only to measure what it saves).
PAD_MATMULS = True


def padded_channels(channels: int, lanes: int, half_panels_lose: bool) -> int | None:
    """Output channels to compute for a conv to ``channels``: a multiple of two vectors when
    that adds at most :data:`MAX_PAD_FRACTION` (a two-vector panel: 240 -> 256 ran 13.5 us
    against 16.1), else of one vector; None when the channels are whole vectors already, when
    padding would add more, or when half-vector panels cost nothing on this CPU (Zen 4's
    512-bit FMAs run as two halves) and half a vector divides the channels."""
    if channels % lanes == 0:
        return None
    if not half_panels_lose and channels % (lanes // 2) == 0:
        return None
    for multiple in (2 * lanes, lanes):
        padded = -(-channels // multiple) * multiple
        if padded - channels <= MAX_PAD_FRACTION * channels:
            return padded
    return None


@expr_functor.mutator
class _PadConvOutputs(PyExprMutator):
    def __init__(self, mod, lanes: int, half_panels_lose: bool) -> None:
        super().__init__(mod)
        self.lanes, self.half_panels_lose = lanes, half_panels_lose
        # A generation artifact's prefill and decode functions read the same weights (equal
        # constants that ``dedup_constants`` merges): padding one function's copy would store
        # a second one. Linears are padded only in single-function modules.
        self.pad_matmuls = PAD_MATMULS and sum(
            isinstance(f, relax.Function) for _, f in mod.functions_items()) == 1
        # call -> (role: conv | inner, channels, padded channels, ends the chain: the slice)
        self.plan: dict = {}

    def value_of(self, expr) -> np.ndarray | None:
        return constant_value(expr, self._bound)

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        self._bound = {b.var: b.value for block in func.body.blocks for b in block.bindings
                       if isinstance(b, relax.VarBinding)} \
            if isinstance(func.body, relax.SeqExpr) else {}
        try:
            self.plan = self._analyse(func) if isinstance(func.body, relax.SeqExpr) else {}
        except (AttributeError, TypeError, ValueError, RuntimeError) as exc:
            log.debug("conv output padding skipped: %s", exc)  # a graph it does not know
            self.plan = {}
        return super().visit_function_(func)

    def _analyse(self, func: relax.Function) -> dict:
        users: dict = {}
        dataflow: set = set()
        var_of: dict = {}
        for block in func.body.blocks:
            for b in block.bindings:
                if not isinstance(b, relax.VarBinding):
                    return {}
                var_of[b.value] = b.var
                if isinstance(block, relax.DataflowBlock) and isinstance(b.var, relax.DataflowVar):
                    dataflow.add(b.var)
                relax.analysis.post_order_visit(
                    b.value, lambda e, user=b.value: users.setdefault(e, []).append(user)
                    if isinstance(e, relax.Var) else None)
        plan: dict = {}
        shared = _shared_constants(func)
        for call, var in var_of.items():
            if not isinstance(call, relax.Call):
                continue
            role = "conv" if _conv_kind(call) == "dense" else \
                "matmul" if self._paddable_matmul(call, shared, users) else None
            if role is None or self.value_of(call.args[1]) is None:
                continue
            shape = _shape(var)
            if shape is None or (role == "conv" and len(shape) != 4):
                continue  # a symbolic batch or map: left alone
            channels = shape[-1]
            padded = padded_channels(channels, self.lanes, self.half_panels_lose)
            if padded is None:
                continue
            chain = [call]
            while var in dataflow and len(users.get(var, ())) == 1:
                user = users[var][0]
                if not self._pads_along(user, var, channels) or user not in var_of:
                    break
                chain.append(user)
                var = var_of[user]
            log.debug("conv output padding: %d -> %d channels, %d epilogue op(s)", channels,
                      padded, len(chain) - 1)
            for i, c in enumerate(chain):
                plan[c] = (role if i == 0 else "inner", channels, padded, i == len(chain) - 1)
        return plan

    def _paddable_matmul(self, call: relax.Call, shared: set, users: dict) -> bool:
        """``x @ W``: a float32 constant 2-D ``W`` nothing else reads (not its data in
        ``shared``, not its variable in ``users`` twice), over more rows than the GEMV kernel
        takes (:data:`.gemv.MAX_ROWS`; a few rows are memory-bound)."""
        from .gemv import MAX_ROWS

        if not self.pad_matmuls or getattr(call.op, "name", None) != "relax.matmul" \
                or _dtype(call) != "float32":
            return False
        weight, out = _shape(call.args[1]), _shape(call)
        if weight is None or out is None or len(weight) != 2 or len(out) < 2:
            return False
        if int(np.prod(out[:-1])) <= MAX_ROWS or len(users.get(call.args[1], ())) > 1:
            return False
        source = _source_constant(call.args[1], self._bound)
        return source is not None and hasattr(source.value, "data_ptr") \
            and data_address(source.value) not in shared

    def _pads_along(self, call, var, channels: int) -> bool:
        """Whether elementwise ``call`` reading ``var`` can run on the padded map: every other
        operand a scalar or a constant per channel (not a runtime tensor, not a divisor that
        varies per pixel), and ``var`` read once."""
        if not isinstance(call, relax.Call) or getattr(call.op, "name", None) not in _ELEMENTWISE:
            return False
        shape = _shape(var)
        if _shape(call) != shape:
            return False  # broadcasting it to more dims or pixels
        reads = 0
        for arg in call.args:
            if isinstance(arg, relax.Var) and arg.same_as(var):
                reads += 1
                continue
            if not isinstance(getattr(arg, "ty", None), relax.TensorType):
                continue  # a scalar (clip's bounds)
            arg_shape = _shape(arg)
            if arg_shape is None or self.value_of(arg) is None:
                return False
            if arg_shape and arg_shape[-1] not in (1, channels):
                return False
            if arg_shape and arg_shape[-1] == channels and any(d != 1 for d in arg_shape[:-1]):
                return False  # a constant over pixels too: not one value per channel
        return reads == 1

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        step = self.plan.get(call)
        if step is None:
            return super().visit_call_(call)
        role, channels, padded, last = step
        args = [self.visit_expr(a) for a in call.args]
        if role == "matmul":
            weight = _pad_axis(self.value_of(call.args[1]), 1, padded)
            new = relax.op.matmul(args[0], relax.const(np.ascontiguousarray(weight),
                                                       str(weight.dtype)),
                                  out_dtype=call.attrs.out_dtype
                                  if str(call.attrs.out_dtype) else None)
        elif role == "conv":
            a = call.attrs
            weight = _pad_axis(self.value_of(call.args[1]), 3, padded)
            new = relax.op.nn.conv2d(
                args[0], relax.const(np.ascontiguousarray(weight), str(weight.dtype)),
                strides=a.strides, padding=a.padding, dilation=a.dilation, groups=a.groups,
                data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                out_layout=a.out_layout, out_dtype=a.out_dtype if str(a.out_dtype) else None)
        else:
            for i, arg in enumerate(call.args):
                shape = _shape(arg)
                value = self.value_of(arg) if shape else None
                if value is None or shape[-1] != channels:
                    continue
                fill = 1.0 if call.op.name == "relax.divide" and i == 1 else 0.0
                value = _pad_axis(value, value.ndim - 1, padded, fill)
                args[i] = relax.const(np.ascontiguousarray(value), str(value.dtype))
            new = relax.Call(call.op, args, call.attrs, call.ty_args)
        if not last:
            return new
        return relax.op.strided_slice(self.builder_.emit(new), axes=[len(_shape(call)) - 1],
                                      begin=[0], end=[channels])


def _source_constant(expr, bound: dict) -> tvm.ir.expr.Constant | None:
    """The constant under ``expr``'s variables, ``permute_dims`` and ``reshape``s."""
    for _ in range(64):
        while isinstance(expr, relax.Var):
            expr = bound.get(expr)
        if isinstance(expr, tvm.ir.expr.Constant):
            return expr
        if not isinstance(expr, relax.Call) or getattr(expr.op, "name", None) not in (
                "relax.permute_dims", "relax.reshape"):
            return None
        expr = expr.args[0]
    return None


def _shared_constants(func: relax.Function) -> set:
    """Data addresses of constants ``func`` reads in more than one place (a tied table)."""
    seen: dict[int, int] = {}

    def visit(expr) -> None:
        if isinstance(expr, tvm.ir.expr.Constant) and hasattr(expr.value, "data_ptr"):
            key = data_address(expr.value)
            seen[key] = seen.get(key, 0) + 1

    # binding by binding: a constant node two bindings share is counted twice
    for block in func.body.blocks:
        for binding in block.bindings:
            relax.analysis.post_order_visit(binding.value, visit)
    return {k for k, n in seen.items() if n > 1}


@tvm.transform.module_pass(opt_level=0, name="SlimcPadConvOutputs")
def pad_conv_outputs(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Dense NHWC convs and constant-weight linears to channel counts no whole vector divides
    compute padded output channels through their elementwise epilogue, then slice (see the
    module)."""
    from tvm.target import Target

    from .common import vector_lanes
    from .nhwc_rewrites import _half_panels_lose

    target = Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return mod
    lanes = vector_lanes(target, 32)
    if lanes < 8:
        return mod
    return relax.transform.DeadCodeElimination()(
        # half panels lose everywhere but on AVX-512 CPUs that split 512-bit FMAs (Zen 4)
        mutate_relax_functions(mod, _PadConvOutputs(mod, lanes,
                                                    lanes != 16 or _half_panels_lose())))
