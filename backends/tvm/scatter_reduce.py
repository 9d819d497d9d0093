"""``scatter_add`` and ``scatter_reduce`` (sum / prod / amax / amin): TVM 0.27 has no
converter for either ("cannot lower op(s) scatter_add.default"), though its
``scatter_elements`` reduces duplicates the same way. Graph, MoE and histogram code uses them.

``include_self=False`` first overwrites every scattered position with the reduction's
identity (0, 1, -inf, +inf), so only the scattered values meet there, as in PyTorch. A
``src`` larger than ``index`` is cut to ``index``'s shape (PyTorch reads only that corner).
``reduce="mean"`` stays refused: its count of what was averaged differs from TVM's.
"""

from __future__ import annotations

from typing import Any

_REDUCTIONS = {"sum": "add", "prod": "mul", "amax": "max", "amin": "min"}


def _identity(reduce: str, dtype: str) -> float | int:
    import numpy as np

    if reduce in ("sum", "prod"):
        return 0 if reduce == "sum" else 1
    if "float" in dtype:
        return float("-inf") if reduce == "amax" else float("inf")
    info = np.iinfo(dtype) if dtype != "bool" else None
    if info is None:
        return 0 if reduce == "amax" else 1
    return int(info.min) if reduce == "amax" else int(info.max)


def _convert(node, importer) -> Any:
    from tvm import relax

    name = str(node.target.__name__)  # "scatter_add.default" / "scatter_reduce.two"
    x, dim, index, src = (node.args[0], node.args[1], node.args[2], node.args[3])
    reduce = "sum" if name.startswith("scatter_add") else str(node.args[4])
    include_self = bool(node.kwargs.get("include_self", node.args[5] if len(node.args) > 5
                                        else True))
    if reduce not in _REDUCTIONS:
        raise AssertionError(f"Unsupported function types ['{name} (reduce={reduce!r})']")
    emit = importer.block_builder.emit
    x, index, src = importer.env[x], importer.env[index], importer.env[src]
    index_shape = [int(d) for d in importer.shape_of(index)]
    src_shape = [int(d) for d in importer.shape_of(src)]
    if src_shape != index_shape:
        src = emit(relax.op.strided_slice(src, list(range(len(index_shape))),
                                          [0] * len(index_shape), index_shape))
    axis = int(dim) % max(len(index_shape), 1)
    if not include_self:
        dtype = str(x.ty.dtype)
        fill = emit(relax.op.full(index_shape, relax.const(_identity(reduce, dtype), dtype),
                                  dtype))
        x = emit(relax.op.scatter_elements(x, index, fill, axis=axis))
    return emit(relax.op.scatter_elements(x, index, src, axis=axis,
                                          reduction=_REDUCTIONS[reduce]))


def converters() -> dict[str, Any]:
    """Converters keyed like TVM's ``custom_convert_map``."""
    return {"scatter_add.default": _convert, "scatter_reduce.two": _convert}
