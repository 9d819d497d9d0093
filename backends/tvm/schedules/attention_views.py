"""Where the fused attention kernel reads ``Q`` / ``V`` and writes its output: head views.

Models split heads with ``reshape(x, [B, L, H, D])`` + ``permute_dims(.., [0, 2, 1, 3])`` after
each projection and merge them back with the inverse permute after ``P @ V``. Taken as they
come, each permute is a copy kernel over the activation (BERT-base at 128 tokens: three
``[B, H, L, D]`` copies of 393 KB per layer plus the output merge), written by one kernel
and read back by the next. The fused kernel indexes with strides anyway, so it can read a
head ``h`` straight from the projection's ``[B, L, H * D]`` output (row stride ``H * D``,
column stride 1) and write its rows into the merged ``[B, L, H * D]`` tensor the output
projection reads: a :class:`Layout` says, per logical axis ``(batch, head, row, column)``,
the stride in the flat tensor the kernel gets.

``K`` keeps its copy: the kernel's ``Q @ K^T`` tile loads vectors along the keys, which are
``H * D`` apart in the projection's layout; that copy (``K^T``, zero-padded to whole vectors)
also takes the scalar scales of ``Q``'s chain (SDPA's ``sqrt(scale)``), which a view cannot.
"""

from __future__ import annotations

from typing import NamedTuple

import tvm
from tvm import relax

from .common import static_dims


class Layout(NamedTuple):
    """A ``(groups, rows, cols)`` operand as a flat tensor of ``size`` floats: group ``g`` is
    batch ``g // heads``, head ``g % heads``; ``strides`` of (batch, head, row, col)."""

    size: int
    heads: int
    strides: tuple[int, int, int, int]

    @staticmethod
    def dense(groups: int, rows: int, cols: int) -> Layout:
        return Layout(groups * rows * cols, groups, (0, rows * cols, cols, 1))

    def offset(self, g, row, col):
        """The flat index of element ``(g, row, col)`` (``g`` may be a TIR expression)."""
        sb, sh, sr, sc = self.strides
        off = (g // self.heads) * sb if sb else 0
        if self.heads > 1:
            off = off + (g % self.heads) * sh
        return off + row * sr + col * sc


class View(NamedTuple):
    """``source`` (any shape, row-major) read or written through ``layout``; ``scale`` is the
    product of the scalar multiplies between ``source`` and the operand."""

    source: relax.Expr
    layout: Layout
    scale: float


def _op(expr) -> str:
    return getattr(getattr(expr, "op", None), "name", "") if isinstance(expr, relax.Call) else ""


def _row_major(shape: list[int]) -> list[int]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return strides[::-1]


def _scalar(expr) -> float | None:
    if not isinstance(expr, tvm.ir.expr.Constant) or str(expr.ty.dtype) != "float32":
        return None
    value = expr.value.numpy()
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _scalar_multiply(value):
    """``(x, c)`` for ``multiply(x, c)`` / ``multiply(c, x)`` with a float scalar ``c``."""
    if _op(value) != "relax.multiply":
        return None
    for pos in (0, 1):
        c = _scalar(value.args[1 - pos])
        if c is not None and static_dims(value.args[pos].ty.shape or []) == \
                static_dims(value.ty.shape or []):
            return value.args[pos], c
    return None


def input_view(operand, var2val: dict, groups: int, rows: int, cols: int) -> View | None:
    """``operand`` (``(.., rows, cols)``, ``groups`` leading elements) as a strided view of the
    tensor its head permute reads: back through reshapes and scalar multiplies to one
    ``permute_dims`` of a 4-D ``(B, L, H, D)``-like tensor, then through reshapes / scalar
    multiplies to its source. None when the chain is anything else (the operand is then
    passed as it is)."""
    node, scale = operand, 1.0
    while True:
        value = var2val.get(node) if isinstance(node, relax.Var) else None
        if _op(value) == "relax.reshape":
            node = value.args[0]
        elif (sm := _scalar_multiply(value)) is not None:
            node, scale = sm[0], scale * sm[1]
        elif _op(value) == "relax.permute_dims":
            break
        else:
            return None
    perm_shape = static_dims(node.ty.shape or [])
    source = value.args[0]
    src_shape = static_dims(source.ty.shape or [])
    if perm_shape is None or src_shape is None or len(perm_shape) != 4 or \
            perm_shape[0] * perm_shape[1] != groups or perm_shape[2:] != [rows, cols]:
        return None
    axes = [int(a) for a in value.attrs.axes] if value.attrs.axes is not None else [3, 2, 1, 0]
    while True:  # the permute's input: a reshape (same flat order) or scaled source
        bound = var2val.get(source) if isinstance(source, relax.Var) else None
        if _op(bound) == "relax.reshape":
            source = bound.args[0]
        elif (sm := _scalar_multiply(bound)) is not None:
            source, scale = sm[0], scale * sm[1]
        else:
            break
    if str(source.ty.dtype) != "float32" or static_dims(source.ty.shape or []) is None:
        return None
    strides = _row_major(src_shape)
    return View(source, Layout(groups * rows * cols, perm_shape[1],
                               tuple(strides[a] for a in axes)), scale)


def output_view(var, consumers: dict, uses: dict, groups: int, rows: int, cols: int):
    """``(permute var, Layout)`` when ``var`` (the ``(groups, rows, cols)`` attention output)
    is read only by a reshape to ``(B, H, rows, cols)`` read only by a ``permute_dims`` that
    keeps the columns last: the kernel then writes the permute's layout, and the permute's
    value is the kernel's output reshaped. Else None."""
    node = var
    while True:
        if uses.get(node, 0) != 1 or node not in consumers:
            return None
        user_var, user = consumers[node]
        if _op(user) == "relax.reshape":
            node = user_var
            continue
        if _op(user) != "relax.permute_dims" or user.attrs.axes is None:
            return None
        break
    shape = static_dims(node.ty.shape or [])
    axes = [int(a) for a in user.attrs.axes]
    if shape is None or len(shape) != 4 or shape[0] * shape[1] != groups or \
            shape[2:] != [rows, cols] or axes[3] != 3:
        return None
    out_strides = _row_major([shape[a] for a in axes])
    strides = [0] * 4
    for k, a in enumerate(axes):  # output axis k holds logical axis axes[k]
        strides[a] = out_strides[k]
    return user_var, Layout(groups * rows * cols, shape[1], tuple(strides))


def consumers_of(func: relax.Function) -> dict:
    """``{var: (binding var, value)}`` of the (last) binding that reads each variable."""
    found: dict = {}
    for block in getattr(func.body, "blocks", []):
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call):
                for arg in value.args:
                    if isinstance(arg, relax.Var):
                        found[arg] = (binding.var, value)
    return found
