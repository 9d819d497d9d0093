"""GPTQ (Frantar et al., 2023): quantize columns one at a time, pushing each column's rounding
error onto the not-yet-quantized columns through the inverse input Hessian.

Round-to-nearest minimises ``||W - Q||``; what matters is ``||X W^T - X Q^T||``. With
``H = 2 X^T X`` the optimal correction of the remaining columns after rounding column ``i`` is
``-(w_i - q_i) / [H^-1]_ii * [H^-1]_i,:``; GPTQ applies it in blocks via the Cholesky factor
of ``H^-1``. Group scales are fixed when the group's first column is reached, from the
already-corrected weights, as in the reference implementation.

``act_order``: quantize the columns in decreasing order of the Hessian's diagonal (the inputs
with the most energy first, while the most columns are left to absorb their error). With groups
this uses the "static groups" variant (AutoGPTQ's ``static_groups``): every group's scale and
minimum are fixed up front from the original weights, so a group is still the same contiguous
``group_size`` inputs and the stored layout (and kernel) is unchanged; only the order in which
the codes are chosen differs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimc.coded_scales import CodedGrid
from slimc.lowbit import bits_of, grid, padded_k

from .formats import Format, Int4Params, coded_grid, int4_params, quantize_int8


def _set_group(fmt: Format, span: Tensor, scales: Tensor, zeros: Tensor, g: int) -> None:
    """Store group ``g``'s scale and zero/minimum, chosen from ``span [N, <=group]``."""
    if fmt.lowbit:
        s, z = grid(span.float(), bits_of(fmt.kind), fmt.group_size)
    else:
        p = int4_params(span.float(), fmt.group_size, fmt.symmetric, fmt.float_zero)
        s, z = p.scale, p.zero
    scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]


def gptq(weight: Tensor, hessian: Tensor, fmt: Format, *, block: int = 128,
         damp: float = 0.01, act_order: bool = False,
         fixed_grid: tuple[Tensor, Tensor] | None = None
         ) -> tuple[Tensor, Int4Params | CodedGrid | Tensor | tuple[Tensor, Tensor]]:
    """Codes and grid of ``weight [N, K]`` given its input Hessian ``[K, K]``.

    int4 -> (codes uint8 [N, K], :class:`Int4Params`); int8 -> (codes int8 [N, K], scale [N]);
    int3/int2 -> (codes uint8 [N, K'] padded to whole groups, (scale, minimum) [N, G]).
    ``act_order``: columns in decreasing Hessian-diagonal order, group grids fixed up front.
    ``-qs`` formats -> (codes, :class:`CodedGrid`): the grid is always fixed up front (static
    groups: its step and minimum codes are relative to per-row units, which need every group
    of the row), from the original weights; GPTQ then chooses the codes on it.
    ``fixed_grid``: a caller's own fixed ``(scale, minimum) [N, G]`` for an int4 ``-fz`` / int3 /
    int2 format (``w = code * scale + minimum``; e.g. a benchmark's experimental grid), used
    like a ``-qs`` grid: static groups, GPTQ chooses only the codes.
    """
    w = weight.double().clone()
    n, k = w.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(k, dtype=h.dtype) * damp * torch.mean(torch.diag(h))
    # perm[j]: the original column quantized j-th (identity unless act_order)
    perm = (torch.argsort(torch.diag(h), descending=True, stable=True) if act_order
            else torch.arange(k))
    if fmt.kind == "int8":
        _, scale8 = quantize_int8(weight)
        scale8_d = scale8.double()
        lo, hi = -127, 127
    grouped = fmt.kind == "int4" or fmt.lowbit
    group = fmt.group_size if grouped else k
    if grouped:
        block = max(group, (block // group) * group)
        groups = -(-k // group)
        # float_zero: fp16 scale and minimum (int4_params' dtypes), used as w = q * s + z
        scales = torch.zeros(n, groups, dtype=torch.float16 if fmt.float_zero else torch.float32)
        zeros = torch.zeros(n, groups, dtype=torch.float16 if fmt.float_zero else
                            torch.float32 if fmt.lowbit else torch.uint8)
    codes = torch.zeros(n, k, dtype=torch.int16)
    coded = coded_grid(weight.float(), fmt) if fmt.coded_scales else None
    static = act_order or coded is not None or fixed_grid is not None
    if coded is not None:
        scales, zeros = coded.decoded()
    elif fixed_grid is not None:
        scales, zeros = fixed_grid
    if act_order:
        # static groups: every grid from the original (dead-zeroed) weights
        if grouped and coded is None and fixed_grid is None:
            for g in range(groups):
                _set_group(fmt, w[:, g * group:(g + 1) * group], scales, zeros, g)
        w, h = w[:, perm], h[perm][:, perm]
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)),
                                     upper=True)
    except RuntimeError:  # not positive definite even with damping: fall back to RTN
        hinv = torch.eye(k, dtype=h.dtype)

    if fmt.lowbit:
        lo, hi = 0, (1 << bits_of(fmt.kind)) - 1
    elif fmt.kind == "int4":
        lo, hi = 0, 15

    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if grouped and static:
                g = int(perm[col]) // group
                s, z = scales[:, g].double(), zeros[:, g].double()
            elif grouped and col % group == 0:
                g = col // group
                span = w1[:, i:i + group] if i + group <= i2 - i1 else w[:, col:col + group]
                _set_group(fmt, span, scales, zeros, g)
                s, z = scales[:, g].double(), zeros[:, g].double()
            elif fmt.kind == "int8":
                s, z = scale8_d, torch.zeros_like(scale8_d)
            x = w1[:, i]
            if fmt.lowbit or fmt.float_zero:  # z is the group's minimum: w = code * s + z
                q = torch.clamp(torch.round((x - z) / s), lo, hi)
                deq = q * s + z
            else:
                q = torch.clamp(torch.round(x / s) + z, lo, hi)
                deq = (q - z) * s
            codes[:, perm[col]] = q.to(torch.int16)
            e = (x - deq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if fmt.kind == "int8":
        return codes.to(torch.int8), scale8
    if fmt.lowbit:
        padded = torch.zeros(n, padded_k(k, group), dtype=torch.uint8)
        padded[:, :k] = codes.to(torch.uint8)
        return padded, coded if coded is not None else (scales, zeros)
    if coded is not None:
        return codes.to(torch.uint8), coded
    return codes.to(torch.uint8), Int4Params(scales, zeros, group)
