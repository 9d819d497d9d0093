"""fp16 / bf16 arithmetic for GPU targets: TVM's ``ToMixedPrecision`` on the lowered module.

``ToMixedPrecision(out_dtype="float32")`` casts the operands of every matmul/conv to fp16 and
gives the op an fp32 accumulator (dlight's Matmul rule turns that into tensor-core WMMA with an
fp32 accumulator fragment on sm_70+), lets element-wise ops follow in fp16, and keeps the ops
it lists as unsafe (softmax, reductions such as ``sum``/``mean``) in fp32; TVM's layer norm and
RMS norm legalizations reduce fp16 inputs in fp32. Weight constants are cast once at build time
(``FoldConstant``), so fp32 weights are stored as fp16. The module's inputs and outputs keep
their dtypes (the pass casts back at the boundary).

TVM's pass only knows fp16; bf16 is the same conversion with every fp16 type renamed to bf16
(:func:`_adjust`): the same ops, the same fp32 accumulation, bf16's range. In both, ``power``
runs in fp32 (an RMSNorm's squares overflow fp16 long before its inputs do).

slimc's own quantized-op kernels (``gpu_quantized.py``) are emitted during import, before this
pass runs; they read :func:`compute_dtype` and take fp16/bf16 activations, dequantize the weight
to fp16/bf16 in registers and accumulate in fp32.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from slimc.precision import DTYPES

from .schedules.common import mutate_relax_functions

_COMPUTE = contextvars.ContextVar("slimc_gpu_compute_dtype", default="float32")


def compute_dtype() -> str:
    """TVM dtype the module being imported computes in (for the quantized-op converters)."""
    return _COMPUTE.get()


@contextlib.contextmanager
def computing_in(precision: str) -> Iterator[None]:
    token = _COMPUTE.set(DTYPES[precision])
    try:
        yield
    finally:
        _COMPUTE.reset(token)


def to_precision(mod, precision: str):
    """``mod`` with activations and arithmetic in ``precision`` (fp32 accumulation)."""
    if precision == "fp32":
        return mod
    from tvm import relax

    mod = relax.transform.ToMixedPrecision(out_dtype="float32")(clip_bounds_as_tensors(mod))
    mod = half_precision_tables(mod)
    if precision == "bf16":
        return _adjust(mod, "bfloat16", _FP32_ONLY_IN_TVM + _FP32_FOR_RANGE)
    return _adjust(mod, "float16", _FP32_FOR_RANGE)


def clip_bounds_as_tensors(mod):
    """``clip(x, lo, hi)`` with scalar (``FloatImm``) bounds as ``minimum(maximum(x, lo), hi)``
    with tensor constants.

    Why: ``ToMixedPrecision`` types every argument of every call as a tensor and stops
    ("Expected TensorType, but got T.float64") at the scalar bounds of the ``clip`` that
    ``relu6``/``hardtanh``/``clamp`` import as -- every MobileNet. The two element-wise ops it
    becomes are what the clip computes, fuse into the producer's epilogue the same way, and
    follow the activations' half type there."""
    import numpy as np
    import tvm
    from tvm import relax

    clip = tvm.ir.Op.get("relax.clip")

    def bound(value, dtype: str):
        number = getattr(value, "value", None)  # a FloatImm/IntImm bound; None if symbolic
        if not isinstance(number, int | float):
            return None
        return relax.const(np.array(number, dtype=dtype))

    @relax.expr_functor.mutator
    class ClipAsMinMax(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: D102 - visitor hook
            call = super().visit_call_(call)
            if call.op != clip or isinstance(call.args[1].ty, relax.TensorType):
                return call
            dtype = _dtype(call.args[0])
            lo, hi = (bound(call.args[i], dtype) if dtype else None for i in (1, 2))
            if lo is None or hi is None:
                return call  # symbolic bounds: left to ToMixedPrecision as they are
            low = self.builder_.emit(relax.op.maximum(call.args[0], lo))
            return relax.op.minimum(low, hi)

    return mutate_relax_functions(mod, ClipAsMinMax(mod))


def half_precision_tables(mod):
    """Embedding lookups ``take(table, ids)`` of constant fp32 tables read an fp16 table.

    ``ToMixedPrecision`` lets ``take`` follow its table's dtype, so every embedding table stayed
    fp32 in the library while its rows were cast to fp16 right after the lookup anyway: twice
    the bytes for nothing (all-MiniLM-L6-v2's 30522 x 384 word table is 47 MB in fp32), and an
    LM's tied table was stored a third time, as the head's fp16 weight. The looked-up rows are
    cast back to fp32 where the graph expects them (exact: every fp16 value is an fp32 one), and
    ``FoldConstant`` stores the table once, in half precision. Runs before :func:`_adjust`,
    which renames the fp16 of this cast to bf16 for bf16 targets."""
    import tvm
    from tvm import relax

    take = tvm.ir.Op.get("relax.take")

    @relax.expr_functor.mutator
    class HalfTables(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: D102 - visitor hook
            call = super().visit_call_(call)
            table = call.args[0] if call.op == take else None
            if not isinstance(table, tvm.ir.expr.Constant) or _dtype(table) != "float32":
                return call
            rows = self.builder_.emit(relax.Call(call.op, [relax.op.astype(table, "float16"),
                                                           *call.args[1:]], call.attrs))
            return relax.op.astype(rows, "float32")

    return mutate_relax_functions(mod, HalfTables(mod))


def _adjust(mod, half: str, fp32_ops: tuple[str, ...]):
    """Rename every ``float16`` cast (and so every fp16 value) of ``mod``'s Relax functions to
    ``half``, and run the ops in ``fp32_ops`` on fp32 copies of their half inputs."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class RenameHalf(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: D102 - visitor hook
            call = super().visit_call_(call)
            if call.op == _ASTYPE() and str(call.attrs.dtype) == "float32":
                # astype(astype(y: f32, half), f32) -> y: an fp32 op's result (power) feeding
                # an fp32 op (mean) is not squeezed through the half type in between
                inner = self.lookup_binding(call.args[0]) if isinstance(
                    call.args[0], relax.Var) else None
                if isinstance(inner, relax.Call) and inner.op == _ASTYPE() and \
                        _dtype(inner.args[0]) == "float32":
                    return inner.args[0]
            if half != "float16" and call.op == _ASTYPE() and \
                    str(call.attrs.dtype) == "float16":
                return relax.op.astype(call.args[0], half)
            if half != "float16" and call.op == _MATMUL() and \
                    str(call.attrs.out_dtype) == "float16":
                return relax.op.matmul(call.args[0], call.args[1], out_dtype=half)
            if isinstance(call.op, tvm.ir.Op) and call.op.name in fp32_ops and \
                    _dtype(call.args[0]) == half:
                args = [relax.op.astype(a, "float32") if _dtype(a) == half else a
                        for a in call.args]
                inner = self.builder_.emit(relax.Call(call.op, args, call.attrs))
                return relax.op.astype(inner, half)
            return call

        def rename(self):
            for gvar, func in mod.functions_items():
                if isinstance(func, relax.Function):
                    self.builder_.update_func(gvar, self.visit_expr(func))
            return self.builder_.get()

    return RenameHalf(mod).rename()


#: Ops whose half-precision result overflows where fp32's does not: ``x ** 2`` of an RMSNorm
#: (torch exports ``pow`` + ``mean``; the mean is fp32 but the squares would be fp16, inf for
#: |x| > 256, which LLM residual streams exceed) and GELU-tanh's ``x ** 3``.
_FP32_FOR_RANGE = ("relax.power",)

#: Ops whose TOPI legalization accepts fp32/fp16 only (``layer_norm.h``: "only support float32
#: and float16"); under bf16 they run on fp32 copies of their inputs.
_FP32_ONLY_IN_TVM = ("relax.nn.layer_norm", "relax.nn.rms_norm", "relax.nn.group_norm",
                     "relax.nn.instance_norm")


def _dtype(expr) -> str | None:
    return str(getattr(expr.ty, "dtype", None) or "") or None


def _ASTYPE():  # noqa: N802 - op handle
    import tvm

    return tvm.ir.Op.get("relax.astype")


def _MATMUL():  # noqa: N802 - op handle
    import tvm

    return tvm.ir.Op.get("relax.matmul")
