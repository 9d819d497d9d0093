"""Quantized group scales ("K-quant" style) for the SmolLM2 harness (issue 17).

Every linear of this SmolLM2 is a dequantized Q4_1 GGUF: it sits exactly on an int4 grid of
32 inputs with an fp16 scale ``d`` and fp16 minimum ``m`` per group (``int4-g32-fz``, 5.0 bits
per weight). A third of those bits are the two fp16 numbers per 32 weights. Storing them as
``bits``-bit codes against one fp16 maximum per row (``d = D * cd / (2^bits - 1)``, ``m = M *
cm / (2^(bits-1) - 1)``, ``cd`` unsigned, ``cm`` signed) costs ``2 bits / g + 32 / K`` per
weight instead of ``32 / g``: at 8 bits, 4.5 + 32/K bits per weight for a relative weight error
of ~0.9% (vs ~8.8% for re-rounding onto an ``int4-g128-fz`` grid at 4.25). The codes are
re-rounded to nearest on the quantized grid (for a Q4_1 matrix almost all stay).

This is what llama.cpp's Q4_K does (6-bit scales and minimums in super-blocks of 256 under
fp16 super-scales); slimc has no such storage format or kernel yet: the harness measures what
it would buy. Method name in a rule: ``kq8`` (``FORMAT:kqN``, N = 2..8): codes rounded to
nearest; ``kq8-ao``: codes chosen by GPTQ with act-order on the same fixed coded grids (for
int3 grids, where rounding to nearest loses much more than the scale codes do).
"""

from __future__ import annotations

import torch

from passes.quantize.formats import Format
from passes.quantize.gptq import gptq
from slimc.lowbit import bits_of, grid


def levels(fmt: Format) -> int:
    """Highest code of ``fmt``'s grid (15 for int4, 7 for int3)."""
    return (1 << bits_of(fmt.kind)) - 1 if fmt.lowbit else 15


def kq_bits_per_weight(fmt: Format, k: int, bits: int) -> float:
    """Stored bits per weight of a row of ``k`` inputs: codes, two ``bits``-bit codes per
    group, two fp16 row maxima."""
    code_bits = bits_of(fmt.kind) if fmt.lowbit else 4
    groups = -(-k // fmt.group_size)
    return (code_bits * k + groups * 2 * bits + 32) / k


def kq_grid(weight: torch.Tensor, fmt: Format, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(step, minimum) [N, G]`` of ``weight [N, K]``'s groups, each already rounded to its
    ``bits``-bit code against the row's fp16 maximum. The uncoded grid: min/max of the group
    for int4 ``-fz`` (a Q4_1 matrix's own grid), slimc's searched fp16 grid
    (``slimc.lowbit.grid``: the smallest squared rounding error) for int3/int2."""
    if not (fmt.float_zero or fmt.lowbit) or not 2 <= bits <= 8:
        raise ValueError(f"kq{bits}: needs an int4 -fz or int3/int2 format and 2..8 bits")
    n, k = weight.shape
    g = fmt.group_size
    groups = -(-k // g)
    if fmt.lowbit:
        step, lo = grid(weight.float(), bits_of(fmt.kind), g)
    else:
        w = torch.nn.functional.pad(weight.float(), (0, groups * g - k))
        view = w.reshape(n, groups, g)
        lo, hi = view.amin(-1), view.amax(-1)
        step = ((hi - lo) / levels(fmt)).half().float()
        lo = lo.half().float()
    dmax = step.amax(-1, keepdim=True).half().float().clamp_min(1e-12)
    mmax = lo.abs().amax(-1, keepdim=True).half().float().clamp_min(1e-12)
    ls, lm = (1 << bits) - 1, (1 << (bits - 1)) - 1
    step = torch.round(step / dmax * ls).clamp(1, ls) * dmax / ls
    lo = torch.round(lo / mmax * lm) * mmax / lm
    return step, lo


@torch.no_grad()
def kq_round_trip(weight: torch.Tensor, fmt: Format, bits: int) -> torch.Tensor:
    """``weight [N, K]`` rounded to nearest on its :func:`kq_grid`."""
    n, k = weight.shape
    g = fmt.group_size
    groups = -(-k // g)
    step, lo = kq_grid(weight, fmt, bits)
    w = torch.nn.functional.pad(weight.float(), (0, groups * g - k))
    view = w.reshape(n, groups, g)
    codes = torch.round((view - lo[..., None]) / step[..., None]).clamp(0, levels(fmt))
    out = (codes * step[..., None] + lo[..., None]).reshape(n, groups * g)
    return out[:, :k].to(weight.dtype)


@torch.no_grad()
def kq_gptq_round_trip(weight: torch.Tensor, hessian: torch.Tensor, fmt: Format, bits: int,
                       damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """``weight [N, K]`` on its :func:`kq_grid` with the codes chosen by slimc's GPTQ with
    act-order (``passes.quantize.gptq.gptq`` given the grid: static groups, only the codes
    move). The grid comes from the weights with the Hessian's dead input columns zeroed, as
    GPTQ zeroes them."""
    n, k = weight.shape
    g = fmt.group_size
    dead = torch.diag(hessian) == 0
    step, lo = kq_grid(weight.masked_fill(dead[None, :], 0.0).float(), fmt, bits)
    codes, _ = gptq(weight, hessian, fmt, block=block, damp=damp, act_order=True,
                    fixed_grid=(step, lo))

    def expand(t: torch.Tensor) -> torch.Tensor:  # per group -> per column
        return t.double().repeat_interleave(g, dim=1)[:, :k]

    return (codes[:, :k].double() * expand(step) + expand(lo)).to(weight.dtype)


@torch.no_grad()
def kq_recode(tuned: torch.Tensor, coded: torch.Tensor, original: torch.Tensor, fmt: Format,
              bits: int) -> torch.Tensor:
    """A kq matrix after recovery with its grids coded to ``bits`` bits again.

    ``coded`` is the matrix on its kq grid (:func:`kq_grid` of ``original``), ``tuned`` the
    same after ``smollm2_recover``'s per-group affine map (codes unchanged, step and minimum
    moved in float). Each group's tuned step and minimum are the exact least-squares fit of
    ``tuned = code * step + minimum``; they are coded against the new fp16 row maxima as
    :func:`kq_grid` does, and the codes are kept (GPTQ's choices are not re-rounded)."""
    n, k = tuned.shape
    g = fmt.group_size
    groups = -(-k // g)
    step, lo = kq_grid(original, fmt, bits)

    def grouped(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x.double(), (0, groups * g - k)).reshape(n, groups, g)

    # a partial last group's padding is no weight: the fit counts real inputs only
    real = grouped(torch.ones(1, k).expand(n, k))
    count = real.sum(-1, keepdim=True)
    codes = torch.round((grouped(coded) - lo[..., None]) / step[..., None]).clamp(0, levels(fmt))
    t = grouped(tuned)
    cm, tm = (codes * real).sum(-1, keepdim=True) / count, (t * real).sum(-1, keepdim=True) / count
    var = ((codes - cm) ** 2 * real).sum(-1)
    cov = ((codes - cm) * (t - tm) * real).sum(-1)
    new_step = torch.where(var > 0, cov / var.clamp_min(1e-12), step.double()).clamp_min(1e-12)
    new_lo = tm[..., 0] - new_step * cm[..., 0]
    dmax = new_step.amax(-1, keepdim=True).half().double().clamp_min(1e-12)
    mmax = new_lo.abs().amax(-1, keepdim=True).half().double().clamp_min(1e-12)
    ls, lm = (1 << bits) - 1, (1 << (bits - 1)) - 1
    new_step = torch.round(new_step / dmax * ls).clamp(1, ls) * dmax / ls
    new_lo = torch.round(new_lo / mmax * lm) * mmax / lm
    out = codes * new_step[..., None] + new_lo[..., None]
    return out.reshape(n, groups * g)[:, :k].to(tuned.dtype)
