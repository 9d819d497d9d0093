"""Defence in depth: every gather in the compiled library clamps its index into the table.

Relax imports ``aten.embedding`` / ``index_select`` as ``relax.take`` in ``"fast"`` mode, which
reads ``table[id]`` with no bounds check: a token id beyond the vocabulary returned memory past
the table, or crashed the process. ``slimc.load`` rejects such ids (the manifest records each
integer input's range), but a C/C++ caller of ``model.so`` skips that check, so
:func:`clamp_gathers` rewrites every ``take`` to ``"clip"`` mode: an out-of-range id reads the
nearest valid row (id ``< 0`` -> row 0, id ``>= rows`` -> the last row) instead of foreign
memory. In-range ids are unaffected (the clamp is a min/max on the index).
"""

from __future__ import annotations


def clamp_gathers(mod):
    """Return ``mod`` with every ``relax.take`` in ``clip`` mode."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    take = tvm.ir.Op.get("relax.take")

    @mutator
    class _Clamp(PyExprMutator):
        def visit_call_(self, call):  # noqa: N802 - TVM's visitor naming
            call = super().visit_call_(call)
            if call.op == take and str(call.attrs.mode) != "clip":
                axis = call.attrs.axis
                return relax.op.take(call.args[0], call.args[1],
                                     None if axis is None else int(axis), mode="clip")
            return call

    updates = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            updates[gvar] = _Clamp(mod).visit_expr(func)
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod
