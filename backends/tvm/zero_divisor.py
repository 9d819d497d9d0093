"""Float division (and modulo) by a constant zero, written so TVM can build it.

TVM's legalization turns a 0-d constant operand of a binary op into a TIR immediate, and
TIR's constant folder then stops on ``x / 0.0`` ("Check failed: fb->value != 0 : Divide by
zero", an internal error at build time): ``torch.nan_to_num(x / 0)``, ``x // 0.0``,
``torch.fmod(x, 0.0)`` all died there, although IEEE arithmetic gives them a value. Here they
become that value's computation before any legalization: ``x / ±0`` and ``x // ±0`` are
``x * ±inf`` (±inf, or NaN where x is 0 or NaN, exactly what the division gives), and
``fmod`` / ``remainder`` by zero are NaN (``x * nan``, which keeps the shape and NaN's
propagation). Integer division by zero is an error in PyTorch and is left alone.
"""

from __future__ import annotations

import math

from .schedules.common import mutate_relax_functions

_FLOATS = {"float16", "float32", "float64", "bfloat16"}
_DIVISIONS = {"relax.divide", "relax.floor_divide"}
_MODULOS = {"relax.mod", "relax.floor_mod"}


def _zero_scalar(expr) -> float | None:
    """``±0.0`` if ``expr`` is a 0-d float constant holding a zero, else None."""
    import tvm

    if not isinstance(expr, tvm.ir.expr.Constant):
        return None
    ty = expr.ty
    if getattr(ty, "ndim", -1) != 0 or str(ty.dtype) not in _FLOATS:
        return None
    value = float(expr.value.numpy())
    return value if value == 0.0 else None


def rewrite_zero_divisors(mod):
    """Return ``mod`` with every float division / modulo by a constant zero rewritten."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _ZeroDivisors(PyExprMutator):
        def visit_call_(self, call):  # noqa: N802 - TVM's visitor naming
            call = super().visit_call_(call)
            name = getattr(call.op, "name", None)
            if name not in _DIVISIONS and name not in _MODULOS:
                return call
            zero = _zero_scalar(call.args[1])
            if zero is None:
                return call
            dtype = str(call.args[1].ty.dtype)
            factor = math.copysign(math.inf, zero) if name in _DIVISIONS else math.nan
            return relax.op.multiply(call.args[0], relax.const(factor, dtype))

    return mutate_relax_functions(mod, _ZeroDivisors(mod))
