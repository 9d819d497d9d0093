"""Lowering helpers for symbolic (dynamic) dimensions captured with ``torch.export.Dim``.

TVM's importer knows each symbol's bounds (``tir_var_upper_bound``) but its shape inference
does not use them: ``position_ids[:, :seq]`` on a 512-long buffer becomes a tensor of length
``min(seq, 512)``, which no longer matches the ``seq``-long token embeddings, and every shape
after the add is unknown (the build then fails in ``emit_te``). The converters here read the
bound from torch's shape environment and tell TVM the slice is in bounds.
"""

from __future__ import annotations

from typing import Any


def symbol_upper_bound(value: Any) -> int | None:
    """The largest value a ``torch.SymInt`` (or int) can take, from torch's shape environment."""
    import torch

    if isinstance(value, int):
        return value
    if not isinstance(value, torch.SymInt):
        return None
    node = value.node
    try:
        bound = node.shape_env.bound_sympy(node.expr).upper
        return int(bound) if bound.is_finite else None
    except Exception:  # noqa: BLE001 - an expression torch cannot bound
        return None


def _convert_slice(node, importer):
    """``aten.slice.Tensor`` whose symbolic end provably lies within a static axis."""
    import torch.fx
    from tvm import relax, tirx

    args = list(node.args) + [None] * (5 - len(node.args))
    _, dim, start, end, step = args
    dim = dim or 0
    start = 0 if start is None else start
    step = 1 if step is None else step
    if isinstance(end, torch.fx.Node) and isinstance(start, int) and isinstance(step, int):
        x = importer.env[node.args[0]]
        shape = importer.shape_of(x)
        axis = dim if dim >= 0 else dim + len(shape)
        size = shape[axis]
        upper = symbol_upper_bound(end.meta.get("val"))
        if isinstance(size, (int, tirx.IntImm)) and upper is not None \
                and 0 <= start and upper <= int(size):
            return importer.block_builder.emit(relax.op.strided_slice(
                x, [axis], [start], [importer.env[end]], [step], assume_inbound=True))
    return importer._slice(node)


def converters() -> dict[str, Any]:
    """Converters keyed like TVM's ``custom_convert_map``."""
    return {"slice.Tensor": _convert_slice}
