"""Gradients through slimc's quantized linear ops, with respect to their activation only.

Why: ``distill`` after ``quantize`` trains the float weights that remain (norms, layers left in
fp32, biases of dense layers) while the quantized weights stay exactly on their grids; the loss
is measured at the model's output, so its gradient must pass *through* every quantized layer to
the activation that feeds it. The ``slimc::*`` ops are opaque to autograd (see
:mod:`slimc.dialect`); this registers, for the linear ones, ``dL/dx = dL/dy · W_deq`` (times the
AWQ ``act_scale``), and for W8A8 the straight-through estimate of the activation rounding. The
packed weights, scales and zero points get no gradient: they are never trained.

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


def _weight_grad(name: str, weight_of: Callable[..., Tensor], act_scale_index: int | None,
                 n_inputs: int) -> None:
    """Register the activation gradient of linear-like op ``slimc::name``: ``weight_of(x,
    *operands)`` returns the dequantized ``[N, K]`` weight the op multiplies ``x`` by."""

    def setup_context(ctx, inputs, output) -> None:
        ctx.operands = inputs

    def backward(ctx, grad: Tensor):
        x, *rest = ctx.operands
        weight = weight_of(x, *rest)
        grad_x = grad @ weight
        if act_scale_index is not None and ctx.operands[act_scale_index] is not None:
            grad_x = grad_x * ctx.operands[act_scale_index]
        return (grad_x,) + (None,) * (n_inputs - 1)

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
    _weight_grad("linear_w8a8", lambda x, q, in_mult, out_scale, b, zp:
                 q.float() * out_scale[:, None], 2, 6)


def differentiable(op_name: str) -> bool:
    """Whether the slimc op ``op_name`` (``linear_int8``) has an activation gradient."""
    register()
    return op_name in _REGISTERED
