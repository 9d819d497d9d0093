"""Orderings and max/min reductions of boolean tensors, computed on integers.

PyTorch orders booleans (``False < True``): ``(x > 0).max(1)`` is "any along the row" with the
first index holding it, ``mask.amin(0)`` is "all", ``torch.sort(mask)`` puts ``False`` first.
TVM 0.27 has no bool kernels for these: ``max``/``min`` fail to build ("Cannot decide
min_value for type bool"), and ``topk``/``sort``/``argsort`` (what ``max.dim`` and ``min.dim``
import as) reach the runtime's sort library, which stops at run time ("Unsupported input
dtype: bool"). Each such op here reads its input cast to int32 (0/1, the same order) and casts
the values it returns back to bool; indices are unchanged.
"""

from __future__ import annotations

from .schedules.common import mutate_relax_functions

#: ops whose result holds input values (cast back to bool) / only indices
_VALUES = {"relax.max", "relax.min", "relax.sort"}
_INDICES = {"relax.argsort", "relax.argmax", "relax.argmin"}
_TOPK = "relax.topk"


def order_bools_as_ints(mod):
    """Return ``mod`` with every bool max/min/sort/argsort/argmax/argmin/topk on int32."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _BoolOrder(PyExprMutator):
        def visit_call_(self, call):  # noqa: N802 - TVM's visitor naming
            call = super().visit_call_(call)
            name = getattr(call.op, "name", None)
            if name not in _VALUES and name not in _INDICES and name != _TOPK:
                return call
            data = call.args[0]
            if str(getattr(data.ty, "dtype", "")) != "bool":
                return call
            emit = self.builder_.emit
            ints = emit(relax.op.astype(data, "int32"))
            new = emit(relax.Call(call.op, [ints, *call.args[1:]], call.attrs, call.ty_args))
            if name in _INDICES:
                return new
            if name in _VALUES:
                return relax.op.astype(new, "bool")
            ret_type = str(call.attrs.ret_type)
            if ret_type == "indices":
                return new
            if ret_type == "values":
                return relax.op.astype(new, "bool")
            values = emit(relax.op.astype(relax.TupleGetItem(new, 0), "bool"))
            return relax.Tuple([values, emit(relax.TupleGetItem(new, 1))])

    return mutate_relax_functions(mod, _BoolOrder(mod))
