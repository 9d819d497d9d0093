"""Hidden channels of depthwise-separable blocks padded to whole vectors with zero filters.

An inverted-residual block (MobileNetV2/V3, EfficientNet, MnasNet) expands its input with a
1x1 conv, filters every channel alone with a depthwise conv, optionally squeezes and excites
it, and projects it back with a 1x1 conv. When the hidden channel count is not a whole number
of SIMD vectors (MobileNetV3-Large's 72, 120, 184, 200 on AVX-512's 16 float lanes) every
kernel on that map runs half-vector panels or predicated tails: a depthwise 3x3 over
56 x 56 x 72 took 2.4x the time of the same conv over 80 channels at 2 threads on the Intel
host (wt/mnv3, ``benchmarks/conv_variants.py``), and 0.65-0.73x for the 5x5 / 14 x 14 ones.
ONNX Runtime's NCHWc convs run exactly the padded shapes.

This pass pads such a hidden map to whole vectors *in the graph*: the convs that produce it
get zero output filters (and zero bias), the depthwise conv zero filters, per-channel
constants of the elementwise ops on the way zeros (ones for a divisor), and the convs that
read it zero input rows. The padded channels hold ``f(0)`` of the block's activations --
finite values -- and reach nothing but zero weights, so the block's outputs are the same
numbers (each real channel's sums gain only ``0 * x`` terms). The padded region is grown from
each depthwise conv over every tensor with its channel count that is connected through
elementwise ops, spatial means (squeeze-excite), and depthwise convs; it is padded only when
all of its edges are dense convs with constant weights (and nothing else reads it: not a
residual add with an outside tensor, not the function's output), else left alone.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax import PyExprMutator, expr_functor

from .common import mutate_relax_functions

log = logging.getLogger("slimc.schedules")

#: Elementwise ops whose value at finite operands is finite, so a padded channel never turns
#: into an inf / NaN that a zero weight would carry into a real channel (``0 * inf = NaN``).
#: ``divide`` qualifies only with a constant divisor (padded with ones).
_ELEMENTWISE = frozenset(f"relax.{name}" for name in (
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "clip", "nn.relu",
    "sigmoid", "tanh", "nn.silu", "nn.gelu", "nn.gelu_tanh", "negative", "abs"))
#: Largest fraction of extra channels the padding may add (184 -> 192: 4%; 72 -> 80: 11%).
MAX_PAD_FRACTION = 0.25


def _shape(expr) -> tuple[int, ...] | None:
    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None) if isinstance(ty, relax.TensorType) else None
    if shape is None or not all(isinstance(d, tirx.IntImm) for d in shape):
        return None
    return tuple(int(d) for d in shape)


def _dtype(expr) -> str:
    ty = getattr(expr, "ty", None)
    return str(getattr(ty, "dtype", "")) if isinstance(ty, relax.TensorType) else ""


def _conv_kind(call) -> str | None:
    """``"dense"`` / ``"depthwise"`` for an NHWC/HWIO float32 ``conv2d``, else None."""
    if not isinstance(call, relax.Call) or getattr(call.op, "name", None) != "relax.nn.conv2d":
        return None
    a = call.attrs
    if (str(a.data_layout) != "NHWC" or str(a.kernel_layout) != "HWIO"
            or str(a.out_layout) not in ("NHWC", "") or _dtype(call) != "float32"):
        return None
    data, weight = _shape(call.args[0]), _shape(call.args[1])
    if data is None or weight is None or len(data) != 4 or len(weight) != 4:
        return None
    if a.groups == 1:
        return "dense"
    if a.groups == data[3] == weight[3] and weight[2] == 1:
        return "depthwise"
    return None


def _is_spatial_mean(call) -> bool:
    if getattr(call.op, "name", None) != "relax.mean" or call.attrs.axis is None:
        return False
    shape = _shape(call.args[0])
    axes = sorted(int(a) % 4 for a in call.attrs.axis) if shape and len(shape) == 4 else None
    return axes is not None and 3 not in axes and bool(call.attrs.keepdims)


class _Region:
    """Tensors (binding vars) of one hidden map and how each op touching them is padded."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.vars: set = set()
        self.calls: dict = {}  # original call -> "out" | "in" | "depthwise" | "inner"


class _Planner:
    """Grows a region from a depthwise conv; None where any edge cannot be padded."""

    def __init__(self, bindings: dict, outputs: dict, users: dict, escaping: set,
                 value_of) -> None:
        self.bindings, self.outputs, self.users = bindings, outputs, users
        self.escaping = escaping
        self.value_of = value_of

    def region(self, seed_var) -> _Region | None:
        channels = _shape(seed_var)[3]
        region, todo = _Region(channels), [seed_var]
        while todo:
            var = todo.pop()
            if var in region.vars:
                continue
            shape = _shape(var)
            if shape is None or len(shape) != 4 or shape[3] != channels or var in self.escaping:
                return None
            region.vars.add(var)
            joined = self._producer(var, region)
            if joined is None:
                return None
            todo += joined
            for user in self.users.get(var, ()):
                joined = self._user(var, user, region)
                if joined is None:
                    return None
                todo += joined
        return region

    def _operands(self, call, region: _Region) -> list | None:
        """Vars of an elementwise call to join the region; None if an operand cannot pad."""
        name = call.op.name
        joined = []
        for i, arg in enumerate(call.args):
            shape = _shape(arg)
            if shape is None:
                # a scalar: clip's bounds (PrimExprs in TVM 0.27, which has no relax.PrimValue)
                if not isinstance(getattr(arg, "ty", None), relax.TensorType):
                    continue
                return None
            if self.value_of(arg) is not None:
                if not shape or shape[-1] in (1, region.channels):
                    continue  # constants are padded (a divisor with ones)
                return None
            if name == "relax.divide" and i == 1:
                return None  # a padded channel's 0 / 0 would be NaN
            if len(shape) == 4 and shape[3] == region.channels:
                joined.append(arg)
            elif not shape or shape[-1] != 1:
                return None
        return joined

    def _producer(self, var, region: _Region) -> list | None:
        call = self.bindings.get(var)
        if not isinstance(call, relax.Call):
            return None
        kind = _conv_kind(call)
        if kind == "dense" and self.value_of(call.args[1]) is not None:
            if region.calls.get(call, "out") != "out":
                return None  # reads and writes the map: not a hidden layer
            region.calls[call] = "out"
            return []
        if kind == "depthwise" and self.value_of(call.args[1]) is not None:
            region.calls[call] = "depthwise"
            return [call.args[0]]
        if getattr(call.op, "name", None) in _ELEMENTWISE:
            region.calls[call] = "inner"
            return self._operands(call, region)
        if _is_spatial_mean(call):
            region.calls[call] = "inner"
            return [call.args[0]]
        return None

    def _user(self, var, call, region: _Region) -> list | None:
        kind = _conv_kind(call)
        out = self.outputs.get(call)
        if kind == "dense" and call.args[0].same_as(var) and not call.args[1].same_as(var) \
                and self.value_of(call.args[1]) is not None:
            if region.calls.get(call, "in") != "in":
                return None  # reads and writes the map: not a hidden layer
            region.calls[call] = "in"
            return []
        if kind == "depthwise" and call.args[0].same_as(var) \
                and self.value_of(call.args[1]) is not None:
            region.calls[call] = "depthwise"
            return [out] if out is not None else None
        if getattr(call.op, "name", None) in _ELEMENTWISE:
            joined = self._operands(call, region)
            region.calls[call] = "inner"
            return None if joined is None or out is None else joined + [out]
        if _is_spatial_mean(call) and out is not None:
            region.calls[call] = "inner"
            return [out]
        return None


def _analyse(func: relax.Function, value_of, lanes: int) -> dict:
    """Original call -> (action, channels, padded channels) for every paddable region."""
    bindings: dict = {}
    outputs: dict = {}  # call -> the var it is bound to
    users: dict = {}
    escaping: set = set()
    seeds = []

    def note_uses(expr, user) -> None:
        def visit(e):
            if isinstance(e, relax.Var):
                if user is None:
                    escaping.add(e)
                else:
                    users.setdefault(e, []).append(user)
        relax.analysis.post_order_visit(expr, visit)

    body = func.body
    for block in body.blocks:
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                for v in relax.analysis.free_vars(binding.value) if hasattr(
                        relax.analysis, "free_vars") else []:
                    escaping.add(v)
                continue
            value = binding.value
            bindings[binding.var] = value
            if isinstance(value, relax.Call):
                outputs[value] = binding.var
                note_uses(relax.Tuple(list(value.args)), value)
                if _conv_kind(value) == "depthwise":
                    seeds.append(binding.var)
            else:
                note_uses(value, None)
            if not isinstance(block, relax.DataflowBlock) or not isinstance(
                    binding.var, relax.DataflowVar):
                escaping.add(binding.var)
    note_uses(body.body, None)

    planner = _Planner(bindings, outputs, users, escaping, value_of)
    plan: dict = {}
    for seed in seeds:
        channels = _shape(seed)[3]
        padded = -(-channels // lanes) * lanes
        if channels % lanes == 0 or bindings[seed] in plan \
                or (padded - channels) > MAX_PAD_FRACTION * channels:
            continue
        region = planner.region(seed)
        if region is None:
            log.debug("channel padding: a %d-channel map left alone", channels)
            continue
        log.debug("channel padding: %d -> %d channels over %d tensors", channels, padded,
                  len(region.vars))
        for call, action in region.calls.items():
            plan[call] = (action, channels, padded)
    return plan


def _pad_axis(value: np.ndarray, axis: int, padded: int, fill: float = 0.0) -> np.ndarray:
    widths = [(0, 0)] * value.ndim
    widths[axis] = (0, padded - value.shape[axis])
    return np.pad(value, widths, constant_values=fill)


def constant_value(expr, bound: dict) -> np.ndarray | None:
    """The numpy value of a constant, or of ``permute_dims`` / ``reshape`` chains of one
    (ConvertLayout's HWIO kernels), through the dataflow bindings ``bound`` (var -> value)."""
    seen = 0
    while isinstance(expr, relax.Var) and seen < 64:
        value = bound.get(expr)
        if value is None:
            return None
        expr, seen = value, seen + 1
    if isinstance(expr, tvm.ir.expr.Constant):
        return expr.value.numpy()
    if not isinstance(expr, relax.Call):
        return None
    name = getattr(expr.op, "name", None)
    if name == "relax.permute_dims":
        inner = constant_value(expr.args[0], bound)
        if inner is None:
            return None
        axes = expr.attrs.axes
        return np.transpose(inner, None if axes is None else [int(a) for a in axes])
    if name == "relax.reshape":
        inner, shape = constant_value(expr.args[0], bound), _shape(expr)
        return None if inner is None or shape is None else inner.reshape(shape)
    return None


@expr_functor.mutator
class _PadChannels(PyExprMutator):
    def __init__(self, mod, lanes: int) -> None:
        super().__init__(mod)
        self.lanes = lanes
        self.plan: dict = {}

    def value_of(self, expr) -> np.ndarray | None:
        return constant_value(expr, self._bound)

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        self._bound = {b.var: b.value for block in func.body.blocks for b in block.bindings
                       if isinstance(b, relax.VarBinding)}
        try:
            self.plan = _analyse(func, self.value_of, self.lanes) \
                if isinstance(func.body, relax.SeqExpr) else {}
        except (AttributeError, TypeError, ValueError, RuntimeError) as exc:
            # a graph shape this analysis does not know: leave it as it is
            log.debug("channel padding skipped: %s", exc)
            self.plan = {}
        return super().visit_function_(func)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        step = self.plan.get(call)
        if step is None:
            return super().visit_call_(call)
        # not super(): it would infer the type of the call with padded and unpadded operands
        new_args = [self.visit_expr(a) for a in call.args]
        action, channels, padded = step
        if action in ("out", "in", "depthwise"):
            weight = self.value_of(call.args[1])
            a = call.attrs
            groups = a.groups
            if action == "in":
                weight = _pad_axis(weight, 2, padded)
            elif action == "out":
                weight = _pad_axis(weight, 3, padded)
            else:
                weight, groups = _pad_axis(weight, 3, padded), padded
            return relax.op.nn.conv2d(
                new_args[0], relax.const(np.ascontiguousarray(weight), str(weight.dtype)),
                strides=a.strides, padding=a.padding, dilation=a.dilation, groups=groups,
                data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                out_layout=a.out_layout, out_dtype=a.out_dtype if str(a.out_dtype) else None)
        args = list(new_args)
        for i, arg in enumerate(call.args):
            shape = _shape(arg)
            value = self.value_of(arg) if shape else None
            if value is None or not shape or shape[-1] != channels:
                continue
            fill = 1.0 if call.op.name == "relax.divide" and i == 1 else 0.0
            value = _pad_axis(value, value.ndim - 1, padded, fill)
            args[i] = relax.const(np.ascontiguousarray(value), str(value.dtype))
        return relax.Call(call.op, args, call.attrs, call.ty_args)


@tvm.transform.module_pass(opt_level=0, name="SlimcPadHiddenChannels")
def pad_hidden_channels(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Pad depthwise-separable blocks' hidden maps to whole float vectors (see the module).

    Only on targets whose float vectors do not divide the channel count (AVX-512's 16 lanes
    and 72 channels; AVX2's 8 lanes divide every MobileNet width, NEON's 4 too).
    """
    from tvm.target import Target

    from .common import vector_lanes

    target = Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return mod
    lanes = vector_lanes(target, 32)
    if lanes <= 1:
        return mod
    return relax.transform.DeadCodeElimination()(
        mutate_relax_functions(mod, _PadChannels(mod, lanes)))
