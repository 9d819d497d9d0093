"""Pre-activation 1x1 convs: the batch norm and ReLU in front of the conv, applied per tile.

A pre-activation network (DenseNet, pre-activation ResNets) runs ``conv1x1(relu(bn(x)))``
where ``x`` is a concatenation or a residual sum, not a conv output: the batch norm cannot be
folded into the weights of a conv before it (there is none) nor into the conv after it (the
ReLU sits in between), and operator fusion never fuses elementwise producers into a conv
(only epilogues). So the norm and ReLU were their own kernel, one more pass over the whole
input map per layer (DenseNet-121: 58 such kernels, ~8% of its time, on maps that grow to
1024 channels), plus a wait for every thread between it and the conv.

This Relax pass (after the layout passes, so convs are NHWC) rewrites such a conv into one
kernel: the per-channel affine chain (``subtract``/``add``/``multiply``/``divide`` by
per-channel operands, i.e. the decomposed batch norm) is collapsed into one ``scale`` and one
``shift`` (tiny per-channel tensors that ``FoldConstant`` evaluates at build time when the norm
is constant), and the kernel computes ``max(x * scale + shift, 0)`` as a prologue block in front
of the conv. The conv rule (:mod:`.cpu_matmul`) computes that block per micro-kernel tile, into
a small buffer the tile then reads (``MR`` pixels by all input channels, vectorized over the
channels): the normalized map is never written to memory.

Only 1x1, stride-1, unpadded, dense NHWC/HWIO float32 convs qualify, and only when every
value of the chain (and the ReLU's output) has no other use (otherwise the norm would be
computed twice), and the chain's input does: a map read by the chain alone gets the norm fused
into its producer's kernel anyway (a conv epilogue, DenseNet's last concat of a block).
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx, topi
from tvm.relax import PyExprMutator, expr_functor

from .common import mutate_relax_functions
from .relax_uses import variable_uses

#: Block annotation marking the prologue for the conv rule.
PROLOGUE_ATTR = "slimc.conv_prologue"
#: Kernel name (contains ``conv2d``, like every conv kernel).
KERNEL_NAME = "conv2d_prologue"

_AFFINE = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide"}


def _static_shape(expr) -> list[int] | None:
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    if shape is None or not all(isinstance(d, tirx.IntImm) for d in shape):
        return None
    return [int(d) for d in shape]


def _per_channel(expr, channels: int) -> bool:
    """Whether ``expr`` broadcasts along the last (channel) axis only: shape ``(.., 1, C)``,
    ``(C,)``, ``(1,)`` or a scalar."""
    shape = _static_shape(expr)
    if shape is None or str(getattr(expr.ty, "dtype", "")) != "float32" or len(shape) > 4:
        return False
    return all(d == 1 for d in shape[:-1]) and (not shape or shape[-1] in (1, channels))


def _eligible(call: relax.Call) -> bool:
    a = call.attrs
    if (str(a.data_layout), str(a.kernel_layout)) != ("NHWC", "HWIO") or int(a.groups) != 1 \
            or str(a.out_layout) not in ("NHWC", "") \
            or any(int(s) != 1 for s in a.strides) or any(int(d) != 1 for d in a.dilation) \
            or any(int(p) for p in a.padding) or str(a.out_dtype) not in ("float32", ""):
        return False
    x, w = call.args
    xs, ws = _static_shape(x), _static_shape(w)
    return xs is not None and ws is not None and len(xs) == 4 and ws[:2] == [1, 1] \
        and str(x.ty.dtype) == "float32" and str(w.ty.dtype) == "float32"


def conv_with_prologue(x: te.Tensor, scale: te.Tensor, shift: te.Tensor,
                       weight: te.Tensor) -> te.Tensor:
    """``conv1x1(max(x * scale + shift, 0), weight)``, NHWC / HWIO, the prologue a block of its
    own (marked :data:`PROLOGUE_ATTR`) in front of TOPI's conv."""
    zero = tirx.const(0, x.dtype)
    act = te.compute(x.shape, lambda n, h, w, c: tirx.max(x[n, h, w, c] * scale[c] + shift[c],
                                                          zero),
                     name="conv_prologue", attrs={PROLOGUE_ATTR: 1})
    return topi.nn.conv(act, weight, stride=1, padding=0, dilation=1, groups=1,
                        data_layout="NHWC", kernel_layout="HWIO", out_dtype=x.dtype)


def conv_with_channel_scale(x: te.Tensor, scale: te.Tensor, weight: te.Tensor) -> te.Tensor:
    """``conv1x1(x * scale, weight)``, NHWC / HWIO, the per-channel scale (a squeeze-excite
    gate) a prologue block (marked :data:`PROLOGUE_ATTR`) in front of TOPI's conv."""
    lead = (0,) * (len(scale.shape) - 1)  # the gate as its (1, 1, 1, C) map: no reshape kernel
    act = te.compute(x.shape, lambda n, h, w, c: x[n, h, w, c] * scale[(*lead, c)],
                     name="conv_prologue", attrs={PROLOGUE_ATTR: 1})
    return topi.nn.conv(act, weight, stride=1, padding=0, dilation=1, groups=1,
                        data_layout="NHWC", kernel_layout="HWIO", out_dtype=x.dtype)


@expr_functor.mutator
class _PrologueConvs(PyExprMutator):
    def __init__(self, mod, uses: dict) -> None:
        super().__init__(mod)
        self.uses = uses

    def _bound(self, expr):
        if not isinstance(expr, relax.Var) or self.uses.get(expr, 0) != 1:
            return None
        value = self.lookup_binding(expr)
        return value if isinstance(value, relax.Call) else None

    def _fuses_into_producer(self, y) -> bool:
        """Whether the chain's input is read by the chain alone and computed by a call here:
        operator fusion then already puts the norm and ReLU into that producer's kernel (a
        conv's epilogue: ResNet-50's BN + ReLU between its 3x3 and 1x1 convs), at no extra
        pass, so moving them into the next conv would only recompute them per tile."""
        return isinstance(y, relax.Var) and self.uses.get(y, 0) == 1 \
            and isinstance(self.lookup_binding(y), relax.Call)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if getattr(call.op, "name", None) != "relax.nn.conv2d" or not _eligible(call):
            return call
        relu = self._bound(call.args[0])
        if relu is not None and getattr(relu.op, "name", None) == "relax.multiply":
            return self._channel_scale(call, relu)
        if relu is None or getattr(relu.op, "name", None) != "relax.nn.relu":
            return call
        shape = _static_shape(call.args[0])
        channels = shape[-1]
        ops, y = [], relu.args[0]
        while (value := self._bound(y)) is not None and getattr(value.op, "name", "") in _AFFINE:
            lhs, rhs = value.args
            if _static_shape(lhs) == shape and _per_channel(rhs, channels):
                ops.append((value.op.name, rhs, True))
                y = lhs
            elif value.op.name in ("relax.add", "relax.multiply") \
                    and _static_shape(rhs) == shape and _per_channel(lhs, channels):
                ops.append((value.op.name, lhs, True))
                y = rhs
            else:
                break
        if not ops or _static_shape(y) != shape or self._fuses_into_producer(y):
            return call
        scale, shift = _affine(reversed(ops))
        bb = self.builder_
        vectors = [bb.emit(relax.op.reshape(relax.op.broadcast_to(v, (1, 1, 1, channels)),
                                            (channels,))) for v in (scale, shift)]
        return bb.call_te(conv_with_prologue, y, *vectors, call.args[1],
                          primfunc_name_hint=KERNEL_NAME)


    def _channel_scale(self, call: relax.Call, product: relax.Call) -> relax.Expr:
        """``conv1x1(y * gate)`` with a per-channel ``gate`` (a squeeze-excite) as one kernel.

        Only when ``y`` has other uses (the squeeze's mean reads it too), so the product would
        otherwise be a map of its own: written by the gate's kernel, read back by the conv."""
        shape = _static_shape(call.args[0])
        if shape[1] * shape[2] == 1:  # a 1 x 1 map (the gate's own layers): nothing to save
            return call
        channels = shape[-1]
        lhs, rhs = product.args
        if _static_shape(lhs) == shape and _per_channel(rhs, channels):
            y, gate = lhs, rhs
        elif _static_shape(rhs) == shape and _per_channel(lhs, channels):
            y, gate = rhs, lhs
        else:
            return call
        if not isinstance(y, relax.Var) or self.uses.get(y, 0) < 2:
            return call
        bb = self.builder_
        if _static_shape(gate) != [1, 1, 1, channels]:
            gate = bb.emit(relax.op.broadcast_to(gate, (1, 1, 1, channels)))
        return bb.call_te(conv_with_channel_scale, y, gate, call.args[1],
                          primfunc_name_hint=KERNEL_NAME)


def _affine(ops) -> tuple[relax.Expr, relax.Expr]:
    """``(scale, shift)`` with ``chain(y) == y * scale + shift`` for the ops applied to ``y`` in
    order (each ``(op, per-channel operand, chain is the left operand)``)."""
    scale: relax.Expr = relax.const(1.0, "float32")
    shift: relax.Expr = relax.const(0.0, "float32")
    for name, a, _ in ops:
        if name == "relax.add":
            shift = relax.op.add(shift, a)
        elif name == "relax.subtract":
            shift = relax.op.subtract(shift, a)
        elif name == "relax.multiply":
            scale, shift = relax.op.multiply(scale, a), relax.op.multiply(shift, a)
        else:  # divide
            scale, shift = relax.op.divide(scale, a), relax.op.divide(shift, a)
    return scale, shift


@tvm.transform.module_pass(opt_level=0, name="SlimcPrologueConvs")
def prologue_convs(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Fuse the per-channel affine + ReLU in front of each eligible 1x1 conv into its kernel."""
    uses: dict = {}
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            uses.update(variable_uses(func))
    return relax.transform.DeadCodeElimination()(
        mutate_relax_functions(mod, _PrologueConvs(mod, uses)))
