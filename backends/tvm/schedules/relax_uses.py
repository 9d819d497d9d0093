"""How often each variable of a Relax function is read: what the graph rewrites ask before
moving or fusing a value (a value read more than once must stay where it is)."""

from __future__ import annotations

from tvm import relax


def variable_uses(func: relax.Function) -> dict:
    """``{var: reads}`` over ``func``'s bindings (call arguments, tuples, tuple items) and its
    output."""
    counts: dict = {}

    def count(expr) -> None:
        if isinstance(expr, relax.Var):
            counts[expr] = counts.get(expr, 0) + 1
        elif isinstance(expr, relax.Tuple):
            for field in expr.fields:
                count(field)
        elif isinstance(expr, relax.Call):
            for arg in expr.args:
                count(arg)
        elif isinstance(expr, relax.TupleGetItem):
            count(expr.tuple_value)

    body = func.body
    for block in getattr(body, "blocks", []):
        for binding in block.bindings:
            count(binding.value)
    count(getattr(body, "body", body))
    return counts
