"""Converters that give ATen ops their PyTorch meaning where TVM 0.27's importer does not.

Registered through ``slimc_register_converters`` (see ``backends/builtin.py``), keyed like
TVM's ``custom_convert_map``; each replaces or adds one op:

* ``select.int`` with a negative index (``x[:, -1]``, ``h_n[-1]``): TVM emits
  ``take(x, -1)``, whose index :func:`~slimc.backends.tvm.bounds.clamp_gathers` clamps to 0 --
  the *first* row instead of the last, a library that runs and computes the wrong thing (a GRU
  classifier reading ``out[:, -1]`` was refused by verification). The index is normalised the
  way PyTorch does, against the static or symbolic length of the axis.
* ``amax.default`` / ``amin.default`` (``torch.amax``, ``torch.amin``): TVM has no converter
  and torch's decomposition yields ``prims.amax``, which it cannot import either. They are
  ``max``/``min`` reductions over ``dim`` (all axes when empty) with ``keepdim``.
* ``min.dim`` (``x.min(dim)``: values and indices): TVM has ``max.dim`` but not ``min.dim``.
* ``adaptive_max_pool2d.default`` (``nn.AdaptiveMaxPool2d``): no TVM converter; TOPI's
  ``adaptive_pool(..., "max")`` computes the values. The argmax indices are not computed: a
  model that uses them (``return_indices=True``) still gets the unsupported-op error.
"""

from __future__ import annotations

from typing import Any


def _convert_select(node, importer):
    """``aten.select.int``: a negative index counts from the end of the axis, as in PyTorch."""
    from tvm import relax, tirx

    x = importer.env[node.args[0]]
    dim, index = node.args[1], node.args[2]
    if not isinstance(index, int) or index >= 0:
        return importer._select(node)
    shape = importer.shape_of(x)
    axis = dim if dim >= 0 else dim + len(shape)
    size = shape[axis]
    if isinstance(size, (int, tirx.IntImm)):
        position = relax.const(int(size) + index, "int64")
        return importer.block_builder.emit(relax.op.take(x, position, axis))
    begin = size + index  # a symbolic length: slice the one row, then drop the axis
    sliced = importer.block_builder.emit(relax.op.strided_slice(
        x, [axis], [begin], [begin + 1], [1], assume_inbound=True))
    return importer.block_builder.emit(relax.op.squeeze(sliced, [axis]))


def _reduction(op_name: str):
    def convert(node, importer):
        """``aten.amax/amin.default(x, dim=[], keepdim=False)``: reduce ``dim`` (all if empty)."""
        from tvm import relax

        x = importer.env[node.args[0]]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", [])
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if isinstance(dim, int):
            dim = [dim]
        axis = list(dim) if dim else None
        reduce = getattr(relax.op, op_name)
        return importer.block_builder.emit(reduce(x, axis=axis, keepdims=bool(keepdim)))

    convert.__name__ = f"_convert_a{op_name}"
    return convert


def _convert_min_dim(node, importer):
    """``aten.min.dim(x, dim, keepdim=False)`` -> (values, int64 indices), as ``max.dim``."""
    from tvm import relax

    x = importer.env[node.args[0]]
    dim = node.args[1]
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    emit = importer.block_builder.emit
    both = emit(relax.op.topk(x, k=1, axis=dim, largest=False, ret_type="both", dtype="int64"))
    values, indices = both[0], both[1]
    if not keepdim:
        values = emit(relax.op.squeeze(values, axis=[dim]))
        indices = emit(relax.op.squeeze(indices, axis=[dim]))
    return emit(relax.Tuple([values, indices]))


def _convert_adaptive_max_pool2d(node, importer):
    """``aten.adaptive_max_pool2d(x, output_size)`` -> (values, indices), values only."""
    import operator

    from tvm import relax, topi

    x = importer.env[node.args[0]]
    if len(importer.shape_of(x)) != 4 or any(
            u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
        raise AssertionError("Unsupported function types ['adaptive_max_pool2d.default "
                             "(return_indices=True or a 3-D input)']")
    size = [int(v) for v in node.args[1]]
    values = importer.block_builder.emit_te(topi.nn.adaptive_pool, x, size, "max", "NCHW")
    return importer.block_builder.emit(relax.Tuple([values, values]))


def converters() -> dict[str, Any]:
    """Converters keyed like TVM's ``custom_convert_map``."""
    return {"select.int": _convert_select, "amax.default": _reduction("max"),
            "amin.default": _reduction("min"), "min.dim": _convert_min_dim,
            "adaptive_max_pool2d.default": _convert_adaptive_max_pool2d}
