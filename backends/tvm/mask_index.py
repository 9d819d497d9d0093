"""Converters for boolean-mask assignment and for index tensors on dynamic axes.

Registered with the other PyTorch-semantics converters (``torch_semantics.converters``):

* ``index_put`` with a boolean mask (``x[mask] = v``, ``x[:, mask] = v``, ``x[mask] += v``):
  TVM's converter accepts integer index tensors only ("IndexPut requires each index tensor to
  have integer dtype"), so the model was refused. A mask assignment never changes a shape:
  it is ``where(mask, v, x)`` with the mask's trailing axes added and ``v`` broadcast as
  PyTorch does. When ``v`` holds one row per selected element (``x[mask] = src`` with
  ``len(src) == mask.sum()``), the row of each selected element is its rank among the
  selected ones: ``cumsum(mask) - 1``, gathered from ``v`` -- the same ``where``, no
  data-dependent shape.
* ``masked_scatter`` (``x.masked_scatter(mask, src)``): no TVM converter; the same
  rank-gather on the flattened, broadcast mask.
* ``index.Tensor`` on an axis of *symbolic* length (``x[:, idx]`` under a dynamic sequence
  length): PyTorch reads negative entries from the end; TVM imports a ``take``, whose index
  :func:`~slimc.backends.tvm.bounds.clamp_gathers` clamps to row 0 -- wrong rows, silently.
  The legalize rule ``negative_index_tensor_wrapped`` wraps static axes before import; a
  symbolic length is only known here, as the Relax shape of the input, so the wrap
  (``where(idx < 0, idx + n, idx)``) is emitted here.
* ``index.Tensor`` with several index tensors among full slices (``x[:, a, b]``; the
  decomposition of ``F.interpolate(mode="trilinear")``): TVM's converter took them one after
  the other (an outer product: ``(n, k, k)`` for two length-``k`` indices) or broadcast the
  slices' ``arange`` into the index block (trilinear upsampling returned ``(4, 4, 12)`` for
  ``(1, 1, 4, 4, 12)``). They are placed as PyTorch's advanced indexing places them.
"""

from __future__ import annotations

from typing import Any


def _is_static(size) -> bool:
    from tvm import tirx

    return isinstance(size, (int, tirx.IntImm))


def _length_tensor(importer, size, dtype: str):
    """A 0-d ``dtype`` tensor holding the (symbolic) axis length ``size``."""
    from tvm import relax

    emit = importer.block_builder.emit
    length = emit(relax.op.shape_to_tensor(relax.ShapeExpr([size])))
    if dtype != "int64":
        length = emit(relax.op.astype(length, dtype))
    return emit(relax.op.reshape(length, []))


def wrap_negative(importer, index, size):
    """``index`` with negative entries counted from the end of an axis of length ``size``."""
    from tvm import relax

    emit = importer.block_builder.emit
    dtype = str(index.ty.dtype)
    length = (relax.const(int(size), dtype) if _is_static(size)
              else _length_tensor(importer, size, dtype))
    negative = emit(relax.op.less(index, relax.const(0, dtype)))
    return emit(relax.op.where(negative, emit(relax.op.add(index, length)), index))


def _meta_shape(node) -> list[int] | None:
    """The static shape torch recorded for an FX node, or None (symbolic or unknown)."""
    shape = getattr(getattr(node, "meta", {}).get("val"), "shape", None)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return [int(d) for d in shape]


def placed_indices(importer, shape, indices) -> tuple[list, list] | None:
    """One index tensor per axis of a tensor of ``shape``, for the ATen ``indices`` (index
    tensors and ``None`` full slices), placed as PyTorch's advanced indexing does: the index
    tensors broadcast into one block, which sits where they are when they are adjacent and in
    front when they are not; each slice is an ``arange`` on its own axis. Returns the indices
    (for ``relax.op.index_tensor`` / ``index_put``) and the result's shape, or None when an
    index tensor's shape is symbolic."""
    import torch
    from tvm import relax

    emit = importer.block_builder.emit
    indices = list(indices) + [None] * (len(shape) - len(indices))
    given = [d for d, idx in enumerate(indices) if idx is not None]
    shapes = [_meta_shape(indices[d]) for d in given]
    if not given or any(s is None for s in shapes):
        return None
    block = list(torch.broadcast_shapes(*[tuple(s) for s in shapes]))
    slices = [d for d in range(len(shape)) if indices[d] is None]
    adjacent = given == list(range(given[0], given[-1] + 1))
    start = given[0] if adjacent else 0
    rank = len(block) + len(slices)
    where = {d: (d if d < start else d - len(given) + len(block)) if adjacent
             else len(block) + j for j, d in enumerate(slices)}
    out_shape: list[Any] = [None] * rank
    out_shape[start:start + len(block)] = block
    full = []
    for d in range(len(shape)):
        if indices[d] is None:
            out_shape[where[d]] = shape[d]
            view = [1] * rank
            view[where[d]] = shape[d]
            arange = emit(relax.op.arange(relax.prim_value(0), shape[d], relax.prim_value(1),
                                          "int64"))
            full.append(emit(relax.op.reshape(arange, view)))
        else:
            own = _meta_shape(indices[d])
            own = [1] * (len(block) - len(own)) + own
            view = [1] * start + own + [1] * (rank - start - len(block))
            full.append(emit(relax.op.reshape(importer.env[indices[d]], view)))
    return full, out_shape


def convert_index_tensor(node, importer):
    """``aten.index.Tensor``: integer index tensors on symbolic axes wrapped; several index
    tensors among full slices placed as PyTorch places them; else TVM's own converter
    (static axes were wrapped by the legalize rule)."""
    import torch
    from tvm import relax

    x = importer.env[node.args[0]]
    shape = list(importer.shape_of(x))
    swapped = {}
    for dim, index in enumerate(node.args[1]):
        val = index.meta.get("val") if index is not None and hasattr(index, "meta") else None
        if val is None or val.dtype not in (torch.int64, torch.int32) or dim >= len(shape) \
                or _is_static(shape[dim]) or index in swapped:
            continue
        swapped[index] = importer.env[index]
        importer.env[index] = wrap_negative(importer, swapped[index], shape[dim])
    try:
        indices = list(node.args[1])
        given = [ix for ix in indices if ix is not None]
        integer = all(ix.meta["val"].dtype != torch.bool for ix in given)
        if integer and 1 < len(given) < len(shape):
            placed = placed_indices(importer, shape, indices)
            if placed is not None:
                return importer.block_builder.emit(relax.op.index_tensor(x, placed[0]))
        return importer._index_tensor(node)
    finally:
        importer.env.update(swapped)


def _selected_rows(importer, mask, values, rest: int):
    """``values[cumsum(mask) - 1]`` shaped ``mask.shape + values.shape[1:]``: the row of
    ``values`` each selected mask element receives (rows of unselected ones are unused)."""
    from tvm import relax

    emit = importer.block_builder.emit
    flat = emit(relax.op.astype(emit(relax.op.reshape(mask, [-1])), "int64"))
    rank = emit(relax.op.subtract(emit(relax.op.cumsum(flat, axis=0)),
                                  relax.const(1, "int64")))
    rank = emit(relax.op.maximum(rank, relax.const(0, "int64")))
    rows = emit(relax.op.take(values, rank, axis=0))
    value_shape = list(importer.shape_of(values))
    shape = list(importer.shape_of(mask)) + value_shape[len(value_shape) - rest:]
    return emit(relax.op.reshape(rows, shape))


def convert_bool_index_put(node, importer) -> Any | None:
    """``index_put(x, [None, ..., mask], v, accumulate)`` with a boolean ``mask`` as a
    ``where``; None when the indices are not one boolean mask after full slices, or ``v`` is
    shaped in a way only a data-dependent scatter computes (then TVM's converter refuses)."""
    import torch
    from tvm import relax

    indices = list(node.args[1])
    given = [d for d, ix in enumerate(indices) if ix is not None]
    if len(given) != 1 or indices[given[0]].meta["val"].dtype != torch.bool:
        return None
    emit = importer.block_builder.emit
    x = importer.env[node.args[0]]
    mask = importer.env[indices[given[0]]]
    values = importer.env[node.args[2]]
    x_rank, m_rank = len(importer.shape_of(x)), len(importer.shape_of(mask))
    rest = x_rank - given[0] - m_rank  # axes after the mask's, taken whole
    v_shape = list(importer.shape_of(values))
    k_axis = len(v_shape) - rest - 1  # the axis of v that runs over the selected elements
    if k_axis >= 0 and not (_is_static(v_shape[k_axis]) and int(v_shape[k_axis]) == 1):
        if k_axis != 0:
            return None
        values = _selected_rows(importer, mask, values, rest)
    elif k_axis >= 0:  # one value for every selected element: the mask's axes instead
        values = emit(relax.op.squeeze(values, [k_axis]))
        values = emit(relax.op.expand_dims(values, list(range(k_axis, k_axis + m_rank))))
    dtype = str(x.ty.dtype)
    if str(values.ty.dtype) != dtype:
        values = emit(relax.op.astype(values, dtype))
    if rest:
        mask = emit(relax.op.expand_dims(mask, list(range(m_rank, m_rank + rest))))
    accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    if accumulate:
        added = emit(relax.op.where(mask, values, relax.const(0, dtype)))
        return emit(relax.op.add(x, added))
    return emit(relax.op.where(mask, values, x))


def convert_masked_scatter(node, importer):
    """``aten.masked_scatter(x, mask, src)``: the selected elements of ``x`` (in row-major
    order) take ``src``'s elements in order."""
    from tvm import relax

    emit = importer.block_builder.emit
    x, mask, src = (importer.env[a] for a in node.args[:3])
    shape = importer.shape_of(x)
    mask = emit(relax.op.broadcast_to(mask, shape))
    flat_src = emit(relax.op.reshape(src, [-1]))
    values = emit(relax.op.reshape(_selected_rows(importer, mask, flat_src, 0), shape))
    if str(values.ty.dtype) != str(x.ty.dtype):
        values = emit(relax.op.astype(values, str(x.ty.dtype)))
    return emit(relax.op.where(mask, values, x))
