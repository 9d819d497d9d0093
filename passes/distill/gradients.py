"""Gradients through slimc's quantized linear ops, with respect to their activation only.

Why: ``distill`` after ``quantize`` trains the float weights that remain (norms, layers left in
fp32, biases of dense layers) while the quantized weights stay exactly on their grids; the loss
is measured at the model's output, so its gradient must pass *through* every quantized layer to
the activation that feeds it. The ``slimc::*`` ops are opaque to autograd (see
:mod:`slimc.dialect`); this registers, for the linear ones, ``dL/dx = dL/dy · W_deq`` (times the
AWQ ``act_scale``), and for W8A8 the straight-through estimate of the activation rounding. The
packed codes never get a gradient. The float scales and zero points / minimums do when they
require one (``distill{scales=true}``: the codes stay, the grid they stand on moves; no bytes
change): their gradient is that of the op's own reference dequantization, fed with
``dL/dW = dL/dy^T x`` (linear) or the gathered rows' gradient (embedding tables).

Ops without a formula here (quantized convolutions, expert gathers) keep failing in backward;
:func:`differentiable` says which ops have one, so the pass freezes whatever lies upstream of
the others instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from slimc.dialect import dequantize_int4, dequantize_int8
from slimc.lowbit import dequantize_lowbit

_REGISTERED: set[str] = set()


#: Operand positions of each op's float grid tensors (scales, float zero points / minimums)
#: that ``distill{scales=true}`` may train.
GRID_OPERANDS: dict[str, tuple[int, ...]] = {
    "linear_int8": (2,), "linear_int4": (2, 3), "linear_lowbit": (2, 3),
    "embedding_int8": (1,), "embedding_int4": (1, 2), "embedding_lowbit": (1, 2),
}


def _grid_grads(ctx, positions: tuple[int, ...], values_of: Callable[..., Tensor],
                grad_values: Tensor) -> dict[int, Tensor]:
    """Gradients of the grid operands at ``positions`` that need one: autograd through
    ``values_of(*operands)`` (the reference dequantization) with ``grad_values``."""
    wanted = [i for i in positions if ctx.needs_input_grad[i]]
    if not wanted:
        return {}
    operands = list(ctx.operands)
    with torch.enable_grad():
        leaves = {i: operands[i].detach().requires_grad_(True) for i in wanted}
        operands = [leaves.get(i, op) for i, op in enumerate(operands)]
        values = values_of(*operands)
        grads = torch.autograd.grad(values, [leaves[i] for i in wanted], grad_values)
    return {i: g.to(ctx.operands[i].dtype) for i, g in zip(wanted, grads, strict=True)}


def _weight_grad(name: str, weight_of: Callable[..., Tensor], act_scale_index: int | None,
                 n_inputs: int) -> None:
    """Register the activation gradient of linear-like op ``slimc::name``: ``weight_of(x,
    *operands)`` returns the dequantized ``[N, K]`` weight the op multiplies ``x`` by (and,
    for its :data:`GRID_OPERANDS` that require one, their gradient)."""

    def setup_context(ctx, inputs, output) -> None:
        ctx.operands = inputs

    def backward(ctx, grad: Tensor):
        x, *rest = ctx.operands
        weight = weight_of(x, *rest)
        grad_x = grad @ weight
        act = ctx.operands[act_scale_index] if act_scale_index is not None else None
        if act is not None:
            grad_x = grad_x * act
        grids = {}
        if any(ctx.needs_input_grad[i] for i in GRID_OPERANDS.get(name, ())):
            xs = (x if act is None else x * act).reshape(-1, x.shape[-1])
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ xs
            grids = _grid_grads(ctx, GRID_OPERANDS[name], weight_of, grad_w)
        return (grad_x,) + tuple(grids.get(i) for i in range(1, n_inputs))

    torch.library.register_autograd(f"slimc::{name}", backward, setup_context=setup_context)
    _REGISTERED.add(name)


def _gather_grad(name: str, op: Callable[..., Tensor], n_inputs: int) -> None:
    """Register the grid operands' gradient of embedding op ``slimc::name`` (the codes and
    the ids get none): autograd through the op's own reference gather + dequantization."""

    def setup_context(ctx, inputs, output) -> None:
        ctx.operands = inputs

    def backward(ctx, grad: Tensor):
        grids = _grid_grads(ctx, GRID_OPERANDS[name], op, grad)
        return tuple(grids.get(i) for i in range(n_inputs))

    torch.library.register_autograd(f"slimc::{name}", backward, setup_context=setup_context)
    _REGISTERED.add(name)


def register() -> None:
    """Register the formulas once per process (idempotent)."""
    if _REGISTERED:
        return
    import slimc.dialect_lowbit  # noqa: F401 - defines slimc::linear_lowbit

    _weight_grad("linear_int8", lambda x, q, s, b, a: dequantize_int8(q, s), 4, 5)
    _weight_grad("linear_int4", lambda x, p, s, z, b, a, g: dequantize_int4(p, s, z, g,
                                                                            x.shape[-1]), 5, 7)
    _weight_grad("linear_fp16", lambda x, w, b: w.float(), None, 3)
    _weight_grad("linear_bf16", lambda x, w, b: w.float(), None, 3)
    _weight_grad("linear_lowbit", lambda x, p, s, m, b, a, bits, g: dequantize_lowbit(
        p, s, m, bits, g, x.shape[-1]), 5, 8)
    # W8A8: codes = round(x * in_mult) (straight through), y = codes @ q^T * out_scale
    _gather_grad("embedding_int8", lambda q, s, ids: q[ids].float() * s[ids][..., None], 3)
    _gather_grad("embedding_int4", _embedding_int4, 5)
    _gather_grad("embedding_lowbit", _embedding_lowbit, 7)
    # (per_row: y = codes(x * in_mult / r) @ q^T * out_scale * r, the row scale r cancels)
    _weight_grad("linear_w8a8", lambda x, q, in_mult, out_scale, b, zp, per_row=False:
                 q.float() * out_scale[:, None], 2, 7)
    # -qs grids (slimc.coded_scales registers its own: no gradient, the grid stays fixed)
    _REGISTERED.add("coded_scale")


def _embedding_int4(packed, scale, zero, ids, group_size):
    from slimc.dialect import embedding_int4_dim

    dim = embedding_int4_dim(packed.shape[1], scale.shape[1], group_size)
    flat = ids.reshape(-1)
    rows = dequantize_int4(packed[flat], scale[flat], zero[flat], group_size, dim)
    return rows.reshape(*ids.shape, dim)


def _embedding_lowbit(packed, scale, minimum, ids, bits, group_size, dim):
    flat = ids.reshape(-1)
    rows = dequantize_lowbit(packed[flat], scale[flat], minimum[flat], bits, group_size, dim)
    return rows.reshape(*ids.shape, dim)


def differentiable(op_name: str) -> bool:
    """Whether the slimc op ``op_name`` (``linear_int8``) has an activation gradient."""
    register()
    return op_name in _REGISTERED
