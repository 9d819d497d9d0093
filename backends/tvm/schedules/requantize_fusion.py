"""Requantization fused into the int8 kernels that produce it (W8A8 conv nets, linears).

Once the layout transposes between W8A8 convolutions cancel (:mod:`.nhwc_rewrites`), the graph
between two of them is ``y = call_tir(int8 kernel)`` (float32 NHWC) followed by elementwise ops
(ReLU6 as ``maximum`` / ``minimum``, then the next layer's quantization: ``multiply``,
``round``, ``add``, clamp, ``astype`` uint8/int8, or int16 for the AVX2 kernel), possibly with
the crop and reshape of a dense kernel's padded output in between. This pass rebuilds the
kernel with that chain as its epilogue (:mod:`..epilogue`), so the convolution writes the next
layer's int8 codes: one byte per element instead of a float32 write, a float32 read and a byte
write by a separate kernel (MobileNetV2 W8A8: ~3.7 of 16.5 ms in those passes). A dense layer
on the AVX2 kernel reads its codes as int16 (``vpmaddwd``'s operand): its producer writes them
as int16 directly, 2 bytes per element, so no separate pass widens them.

A chain qualifies when every intermediate value has exactly one user, every op is elementwise
with a float32 scalar or per-channel (last axis) constant as its other operand, and it ends in
an ``astype`` to an 8-bit integer (or int16: AVX2 codes, still -128..127). A crop
(``strided_slice`` of the padded rows / channels) or a reshape that keeps the last axis may sit
in the chain: it commutes with ops that broadcast on the last axis, so it is applied to the
fused kernel's int8 output instead. Kernels say they can be rebuilt through
:data:`..int8_kernels.REBUILD_ATTR`; anything else is left alone.
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

from .common import mutate_relax_functions

#: Relax elementwise ops folded into an epilogue (the binary ones take a constant operand).
_UNARY = {"relax.round": ("round",)}
_BINARY = {f"relax.{name}": name for name in
           ("add", "subtract", "multiply", "divide", "maximum", "minimum")}
_LAYOUT = ("relax.strided_slice", "relax.reshape")
_INT8 = ("int8", "uint8", "int16")


def _builders():
    from slimc.backends.tvm import int8_conv, int8_kernels

    return {"dot": int8_kernels.dot_kernel, "generic": int8_kernels.generic_kernel,
            "depthwise_nhwc": int8_conv.depthwise_nhwc_kernel}


def _shape(expr) -> tuple[int, ...] | None:
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(d) for d in ty.shape.values)
    except (AttributeError, TypeError, ValueError):
        return None


def _dtype(expr) -> str | None:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _ints(arg) -> list[int] | None:
    try:
        if isinstance(arg, relax.Tuple):
            return [int(f.value) for f in arg.fields]
        if isinstance(arg, relax.ShapeExpr):
            return [int(v) for v in arg.values]
    except (AttributeError, TypeError, ValueError):
        return None
    return None


def _prefix_crop(call: relax.Call) -> bool:
    """A ``strided_slice`` of a 2-D tensor that keeps leading rows and leading columns."""
    if len(call.args) < 4 or _shape(call.args[0]) is None or len(_shape(call.args[0])) != 2:
        return False
    axes, begin = _ints(call.args[1]), _ints(call.args[2])
    strides = _ints(call.args[4]) if len(call.args) > 4 else None
    return (axes is not None and begin is not None and all(b == 0 for b in begin)
            and (strides is None or all(s == 1 for s in strides)))


class _Chain:
    """What one fusion does: the kernel call, the epilogue, its vectors, the deferred ops."""

    def __init__(self, kernel_call: relax.Call, channels: int) -> None:
        self.kernel_call = kernel_call
        self.channels = channels  # the kernel's output channels (its last axis)
        self.ops: list[tuple] = []
        self.vectors: list[np.ndarray] = []
        self.layout: list[relax.Call] = []

    def add_binary(self, name: str, value, other, swapped: bool) -> bool:
        """Record ``name(value, other)``; False if ``other`` is not a usable constant."""
        if not isinstance(other, tvm.ir.expr.Constant) or str(other.value.dtype) != "float32":
            return False
        array = other.value.numpy()
        if array.size == 1:
            self.ops.append((name, "scalar", float(array.reshape(())), swapped))
            return True
        last = _shape(value)[-1] if _shape(value) else None
        if array.shape[-1] != last or any(d != 1 for d in array.shape[:-1]):
            return False
        if array.ndim > len(_shape(value)):
            return False
        vector = np.zeros(self.channels, np.float32)  # padded channels: cropped afterwards
        vector[:last] = array.reshape(-1)
        self.ops.append((name, "vector", len(self.vectors), swapped))
        self.vectors.append(vector)
        return True


@expr_functor.mutator
class _FuseRequantize(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod_ = mod
        self.plans: dict = {}

    def plan(self, func: relax.Function) -> None:
        """Find the chains of ``func`` (keyed by the final ``astype`` call)."""
        bindings = [b for block in func.body.blocks for b in block.bindings
                    if isinstance(b, relax.VarBinding)]
        users: dict = {}

        def count(expr) -> None:
            def visit(e) -> None:
                if isinstance(e, relax.Var):
                    users.setdefault(e, []).append(None)
            relax.analysis.post_order_visit(expr, visit)

        value_of = {b.var: b.value for b in bindings}
        consumer: dict = {}
        for b in bindings:
            count(b.value)
            def note(e, var=b.var) -> None:
                if isinstance(e, relax.Var):
                    consumer.setdefault(e, []).append(var)
            relax.analysis.post_order_visit(b.value, note)
        count(func.body.body)
        for b in bindings:
            chain = self._chain_from(b, value_of, users, consumer)
            if chain is not None:
                final_call, plan = chain
                self.plans[final_call] = plan

    def _chain_from(self, binding, value_of, users, consumer):
        call = binding.value
        if not isinstance(call, relax.Call) or getattr(call.op, "name", "") != "relax.call_tir":
            return None
        gvar = call.args[0]
        func = self.mod_[gvar] if gvar in self.mod_.get_global_vars() else None
        from slimc.backends.tvm.int8_kernels import REBUILD_ATTR

        if func is None or func.attrs is None or REBUILD_ATTR not in func.attrs:
            return None
        out = _shape(binding.var)
        if out is None or _dtype(binding.var) != "float32":
            return None
        chain = _Chain(call, out[-1])
        var = binding.var
        while True:
            # ``users`` counts occurrences, so a var read twice by one op does not qualify
            if len(users.get(var, ())) != 1 or len(consumer.get(var, ())) != 1:
                return None
            nxt = consumer[var][0]
            op = value_of.get(nxt)
            if not isinstance(op, relax.Call):
                return None
            name = getattr(op.op, "name", "")
            if name in _UNARY and op.args[0].same_as(var):
                chain.ops.append(_UNARY[name])
            elif name in _BINARY and len(op.args) == 2:
                swapped = op.args[1].same_as(var)
                if not swapped and not op.args[0].same_as(var):
                    return None
                other = op.args[0] if swapped else op.args[1]
                if _dtype(var) != "float32" or not chain.add_binary(_BINARY[name], var, other,
                                                                   swapped):
                    return None
            elif name == "relax.astype" and _dtype(nxt) in _INT8 and _dtype(var) == "float32":
                chain.ops.append(("astype", _dtype(nxt)))
                return op, chain
            elif name in _LAYOUT and op.args[0].same_as(var):
                before, after = _shape(var), _shape(nxt)
                if before is None or after is None or after[-1] > before[-1]:
                    return None
                if name == "relax.strided_slice" and not _prefix_crop(op):
                    return None
                if name == "relax.reshape" and after[-1] != before[-1]:
                    return None
                chain.layout.append(op)
            else:
                return None
            var = nxt

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        plan = self.plans.get(call)
        if plan is None:
            return super().visit_call_(call)
        kernel_call = plan.kernel_call
        gvar = kernel_call.args[0]
        from slimc.backends.tvm import epilogue as epi
        from slimc.backends.tvm.int8_kernels import REBUILD_ATTR
        from slimc.backends.tvm.quantized_ops import add_kernel

        builder, args = json.loads(str(self.mod_[gvar].attrs[REBUILD_ATTR]))
        ops = tuple(plan.ops)
        func = _builders()[builder](*epi.freeze(args), epilogue=ops)
        new_gvar = add_kernel(self.builder_, func)
        kernel_args = [self.visit_expr(a) for a in kernel_call.args[1].fields]
        kernel_args += [relax.const(v) for v in plan.vectors]
        shape = _shape(kernel_call) or _shape(plan.kernel_call)
        out = self.builder_.emit(relax.call_tir(
            new_gvar, kernel_args, relax.TensorType(shape, epi.output_dtype(ops))))
        for layout in plan.layout:
            out = self.builder_.emit(relax.Call(layout.op, [out, *layout.args[1:]],
                                                layout.attrs, layout.ty_args))
        return out


@tvm.transform.module_pass(opt_level=0, name="SlimcFuseRequantize")
def fuse_requantize(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Rebuild int8 kernels with the elementwise chain to the next layer's codes fused in."""
    mutator = _FuseRequantize(mod)
    found = False
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.plan(func)
            found = found or bool(mutator.plans)
    if not found:
        return mod
    return relax.transform.DeadCodeElimination()(mutate_relax_functions(mod, mutator))
