"""Fast, vectorizable transcendental functions (exp, erf, tanh, sigmoid) for CPU kernels.

LLVM has no vector ``exp``/``erf``/``tanh`` on x86 or aarch64 without a vector math library, so
a vectorized softmax or GELU loop becomes one scalar libm call per element -- the slowest
kernels of a transformer after the matmuls. TVM's ``topi.fast_*`` are branch-free polynomial
versions (relative error ~1e-7 in fp32) that vectorize like any arithmetic. This Relax pass
swaps them in before legalization; it extends TVM's ``FastMathTransform`` (exp, erf, tanh,
softmax) to GELU, sigmoid and SiLU, which it misses. Only fp32 is rewritten: the polynomials
are fitted for it.

``power`` by a constant small integer (``x ** 3`` in GPT-2's ``gelu_new``, ``x ** 2`` in
hand-written norms) is the same trap: LLVM keeps ``pow`` a scalar ``powf`` call per lane, so
GPT-2 small's GELU kernel ran 23.5 ms of a 164 ms prefill (ORT's FastGelu: 2.4 ms). It becomes
repeated multiplication (at most two roundings more than ``powf``).
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, te, topi
from tvm.relax import PyExprMutator, expr_functor

from .common import mutate_relax_functions


def _gelu(x: te.Tensor) -> te.Tensor:
    erf = topi.fast_erf(topi.multiply(x, tvm.tirx.const(1 / math.sqrt(2), x.dtype)))
    return te.compute(x.shape, lambda *i: x(*i) * (0.5 + 0.5 * erf(*i)), name="fast_gelu")


def _gelu_tanh(x: te.Tensor) -> te.Tensor:
    c = math.sqrt(2 / math.pi)
    inner = te.compute(x.shape, lambda *i: c * (x(*i) + 0.044715 * x(*i) * x(*i) * x(*i)),
                       name="gelu_inner")
    t = topi.fast_tanh(inner)
    return te.compute(x.shape, lambda *i: x(*i) * (0.5 + 0.5 * t(*i)), name="fast_gelu_tanh")


def _sigmoid(x: te.Tensor) -> te.Tensor:
    e = topi.fast_exp(topi.negative(x))
    return te.compute(x.shape, lambda *i: 1.0 / (1.0 + e(*i)), name="fast_sigmoid")


def _silu(x: te.Tensor) -> te.Tensor:
    e = topi.fast_exp(topi.negative(x))
    return te.compute(x.shape, lambda *i: x(*i) / (1.0 + e(*i)), name="fast_silu")


_REWRITES = {
    "relax.exp": topi.fast_exp,
    "relax.erf": topi.fast_erf,
    "relax.tanh": topi.fast_tanh,
    "relax.sigmoid": _sigmoid,
    "relax.nn.gelu": _gelu,
    "relax.nn.gelu_tanh": _gelu_tanh,
    "relax.nn.silu": _silu,
}


#: Constant exponents of ``power`` unrolled into multiplications (``_integer_power``).
MAX_UNROLLED_POWER = 4


def _integer_exponent(expr: relax.Expr) -> int | None:
    """The exponent when ``expr`` is a one-element constant holding an integer in
    ``[2, MAX_UNROLLED_POWER]``, else None."""
    if not isinstance(expr, tvm.ir.expr.Constant):
        return None
    value = expr.value.numpy()
    if value.size != 1:
        return None
    v = float(value.reshape(-1)[0])
    return int(v) if v.is_integer() and 2 <= v <= MAX_UNROLLED_POWER else None


@expr_functor.mutator
class _FastMath(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        op = getattr(call.op, "name", None)
        if op == "relax.power":
            return self._integer_power(call)
        if op not in _REWRITES and op != "relax.nn.softmax":
            return call
        ty = getattr(call.args[0], "ty", None)  # relax.TensorType in TVM 0.27
        if not isinstance(ty, relax.TensorType) or str(ty.dtype) != "float32":
            return call
        if op == "relax.nn.softmax":
            return self.builder_.call_te(topi.nn.fast_softmax, call.args[0], call.attrs.axis)
        return self.builder_.call_te(_REWRITES[op], call.args[0])

    def _integer_power(self, call: relax.Call) -> relax.Expr:
        """``x ** n`` for a constant integer ``2 <= n <= 4`` as ``n - 1`` multiplications
        (``x ** 4`` as ``(x * x) * (x * x)``), fp32 only, when the result has ``x``'s shape."""
        x, n = call.args[0], _integer_exponent(call.args[1])
        ty, out = getattr(x, "ty", None), getattr(call, "ty", None)
        if n is None or not isinstance(ty, relax.TensorType) or str(ty.dtype) != "float32" \
                or not isinstance(out, relax.TensorType) or out.ndim != ty.ndim:
            return call
        square = relax.op.multiply(x, x)
        if n == 2:
            return square
        return relax.op.multiply(square, x if n == 3 else square)


@tvm.transform.module_pass(opt_level=0, name="SlimcFastMath")
def fast_math(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Replace fp32 exp/erf/tanh/sigmoid/GELU/SiLU/softmax with vectorizable approximations."""
    return mutate_relax_functions(mod, _FastMath(mod))
