"""Batched matmuls against a broadcast weight, as one matmul over the folded batch.

PyTorch's ``matmul`` decomposition folds ``linear(x, W)`` over a 3-D ``x`` into one 2-D matmul
only when ``x``'s strides allow a view; otherwise it exports ``expand(W)`` + ``bmm``. That is
what BERT's attention output projection gets (its input is the heads' transpose, reshaped):
the importer keeps the ``expand`` as ``broadcast_to(W^T, (batch, K, N))`` and ``FoldConstant``
then stores the weight *batch times* in the library -- a MiniLM at batch 8 carried 26 MB of
copies (116 MB library for 90 MB of weights), and each batch element's matmul read its own copy.

Here ``matmul(A, broadcast_to(W, (B..., K, N)))`` with a 2-D ``W`` becomes
``reshape(matmul(reshape(A, (prod(B...) * M, K)), W), (B..., M, N))``: the form every other
linear of the model already has, so it takes the same matmul schedules, and ``W`` is stored once.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .common import mutate_relax_functions


def _shape(expr) -> list | None:
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    return list(getattr(ty.shape, "values", ty.shape))


def _equal(a, b) -> bool:
    if isinstance(a, tvm.tirx.IntImm) and isinstance(b, tvm.tirx.IntImm):
        return int(a.value) == int(b.value)
    return a.same_as(b)


@mutator
class _FoldBroadcastWeights(PyExprMutator):
    def _broadcast_source(self, expr):
        """``W`` if ``expr`` is bound to ``broadcast_to(W, shape)`` with a 2-D ``W``."""
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        if not isinstance(value, relax.Call) or getattr(value.op, "name", None) != \
                "relax.broadcast_to":
            return None
        source, target = _shape(value.args[0]), _shape(value)
        if source is None or target is None or len(source) != 2 or \
                not all(_equal(a, b) for a, b in zip(source, target[-2:], strict=True)):
            return None  # not 2-D, or a 1-sized row/column of W broadcast too
        return value.args[0]

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if getattr(call.op, "name", None) != "relax.matmul":
            return call
        weight = self._broadcast_source(call.args[1])
        lhs, out = _shape(call.args[0]), _shape(call)
        if weight is None or lhs is None or out is None or len(lhs) < 3 or \
                len(out) != len(lhs):
            return call
        rows = lhs[0]
        for extent in lhs[1:-1]:
            rows = rows * extent
        flat = self.builder_.emit(relax.op.reshape(call.args[0], [rows, lhs[-1]]))
        product = self.builder_.emit(relax.op.matmul(flat, weight,
                                                     out_dtype=call.attrs.out_dtype))
        return relax.op.reshape(product, out)


@tvm.transform.module_pass(opt_level=0, name="SlimcFoldBroadcastWeights")
def fold_broadcast_weights(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Every ``matmul(A, broadcast_to(2-D W))`` over a folded batch (module docstring)."""
    return relax.transform.DeadCodeElimination()(
        mutate_relax_functions(mod, _FoldBroadcastWeights(mod)))
