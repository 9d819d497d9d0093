"""``squeeze`` with negative axes, rewritten to non-negative ones before the NHWC conversion.

TVM 0.27's ``ConvertLayout`` fails with ``std::bad_alloc`` on a ``squeeze`` whose axis is
negative once its input has been given a channels-last layout: its layout inference indexes the
layout with the unnormalised axis. Hugging Face's ``AdaptiveAvgPool1d`` pooler (``expand_dims``
at -2, a mean, ``squeeze`` at -2) ends the FocalNet, Swin, Hiera and SigLIP models (the four of
50 benchmark workloads it hit), so the conversion failed on the whole model and every conv
stayed NCHW: FocalNet-T's 2 x 2 patch-merging and 1 x 1 context convs ran at ~80 GFLOP/s,
5.2 ms a call (session 27). The rewrite changes no value: ``squeeze(x, [-2])`` is
``squeeze(x, [ndim - 2])``.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

from .common import mutate_relax_functions


@expr_functor.mutator
class _NonNegativeSqueeze(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if getattr(call.op, "name", None) != "relax.squeeze" or call.attrs.axis is None:
            return call
        axes = [int(a) for a in call.attrs.axis]
        ndim = getattr(getattr(call.args[0], "ty", None), "ndim", -1)
        if all(a >= 0 for a in axes) or ndim is None or ndim < 0:
            return call
        return relax.op.squeeze(call.args[0], [a % ndim for a in axes])


@tvm.transform.module_pass(opt_level=0, name="SlimcNonNegativeSqueeze")
def non_negative_squeeze(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Every ``squeeze`` of a known rank with its axes counted from the front."""
    return mutate_relax_functions(mod, _NonNegativeSqueeze(mod))
