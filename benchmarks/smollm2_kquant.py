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
it would buy. Method name in a rule: ``kq8`` (``FORMAT:kqN``, N = 2..8).
"""

from __future__ import annotations

import torch

from passes.quantize.formats import Format
from slimc.lowbit import bits_of


def levels(fmt: Format) -> int:
    """Highest code of ``fmt``'s grid (15 for int4, 7 for int3)."""
    return (1 << bits_of(fmt.kind)) - 1 if fmt.lowbit else 15


def kq_bits_per_weight(fmt: Format, k: int, bits: int) -> float:
    """Stored bits per weight of a row of ``k`` inputs: codes, two ``bits``-bit codes per
    group, two fp16 row maxima."""
    code_bits = bits_of(fmt.kind) if fmt.lowbit else 4
    groups = -(-k // fmt.group_size)
    return (code_bits * k + groups * 2 * bits + 32) / k


@torch.no_grad()
def kq_round_trip(weight: torch.Tensor, fmt: Format, bits: int) -> torch.Tensor:
    """``weight [N, K]`` on a min/max grid of ``fmt``'s group size and code width whose
    per-group step and minimum are ``bits``-bit codes against the row's fp16 maxima."""
    if not (fmt.float_zero or fmt.lowbit) or not 2 <= bits <= 8:
        raise ValueError(f"kq{bits}: needs an int4 -fz or int3/int2 format and 2..8 bits")
    n, k = weight.shape
    g = fmt.group_size
    groups = -(-k // g)
    w = torch.nn.functional.pad(weight.float(), (0, groups * g - k))
    view = w.reshape(n, groups, g)
    lo, hi = view.amin(-1), view.amax(-1)
    top = levels(fmt)
    step = ((hi - lo) / top).half().float()
    lo = lo.half().float()
    dmax = step.amax(-1, keepdim=True).half().float().clamp_min(1e-12)
    mmax = lo.abs().amax(-1, keepdim=True).half().float().clamp_min(1e-12)
    ls, lm = (1 << bits) - 1, (1 << (bits - 1)) - 1
    step = torch.round(step / dmax * ls).clamp(1, ls) * dmax / ls
    lo = torch.round(lo / mmax * lm) * mmax / lm
    codes = torch.round((view - lo[..., None]) / step[..., None]).clamp(0, top)
    out = (codes * step[..., None] + lo[..., None]).reshape(n, groups * g)
    return out[:, :k].to(weight.dtype)
