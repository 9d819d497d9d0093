"""int8 activations for int8-weight linears (W8A8), calibrated per layer.

A W8A8 linear quantizes its input and runs the matmul in integers (``slimc::linear_w8a8``),
with one fixed scale (:func:`static_int8`) or each row's own scale found at run time
(:func:`dynamic_int8`, per token; ``quantize{act_scales=...}`` picks per layer). For the
static scale two choices decide its accuracy, and both are searched on the calibration rows
that enter the layer, minimising the layer's output error (per-row scales search the first):

* **SmoothQuant migration** (Xiao et al., 2023): a few input channels carry activations far
  larger than the rest, which a per-tensor scale cannot resolve. Dividing channel ``k`` of the
  input by ``s_k = max|x_k|^alpha / max|w_k|^(1-alpha)`` and multiplying column ``k`` of the
  weight by it moves that range into the per-row-quantized weight; ``alpha = 0`` keeps the
  layer as is. The division is folded into the op's ``in_mult``, so no other op changes.
* **Range**: symmetric (``[-c, c]``, zero point 0) or asymmetric (``[lo, hi]`` over all 256
  codes, with a zero point: GELU outputs are almost never below -0.17, so a symmetric grid would
  waste half its codes), where the ends are the extremes seen or high quantiles of them;
  clipping rare outliers buys resolution for everything else.

The calibrated scale is also why W8A8 needs representative ``--calib`` data: inputs far outside
the calibrated range are clipped at run time.

Convolutions use the same search on their im2col rows (``calib.im2col``): the weight matrix is
``[O, I/g * kernel]`` and the rows ``[R, I * kernel]``, split into ``groups`` blocks of columns
(one per convolution group, a batched matmul), and SmoothQuant's factor is chosen per *input
channel* (``channel_size`` = columns per channel, the kernel's area), because the kernel
multiplies the input tensor before it is unfolded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from slimc.jobs import map_single_threaded

from .formats import quantize_int8

#: SmoothQuant migration strengths tried per layer (0 = no migration).
ALPHAS = (0.0, 0.25, 0.5, 0.65, 0.75, 0.85)
#: Clipping candidates: quantiles of |x| on the calibration sample (1.0 = the largest seen).
QUANTILES = (1.0, 0.99999, 0.9999, 0.999)


@dataclass
class StaticInt8:
    """The packed tensors of one W8A8 linear and what the search chose."""

    weight: Tensor  # int8 [N, K]
    in_mult: Tensor  # f32 [K] (convs: [I], per input channel): 1 / (smooth * input_scale)
    out_scale: Tensor  # f32 [N]: input_scale * weight_scale_n
    weight_scale: Tensor  # f32 [N]: weight_scale_n (a tied table's gathers read codes * it)
    zero_point: int  # activation code of 0.0 (0: symmetric)
    alpha: float
    clip: float  # quantile of the range kept (1.0: everything seen)
    error: float  # relative output error on the calibration rows
    #: Per-row (per-token) scales found at run time (:func:`dynamic_int8`): ``in_mult`` is
    #: then ``1 / smooth`` and ``out_scale`` the weight's scales alone.
    per_row: bool = False

    def tensors(self) -> dict[str, Tensor]:
        return {"weight": self.weight, "in_mult": self.in_mult, "out_scale": self.out_scale}


def _ranges(scaled: Tensor, low: float, high: float) -> list[tuple[float, int, float]]:
    """Candidate ``(scale, zero point, quantile)`` triples for the smoothed input ``scaled``,
    symmetric and asymmetric per quantile; ``low``/``high`` are the extremes over all
    calibration rows."""
    out = []
    flat = scaled.flatten()
    magnitudes = flat.abs()
    top = max(-low, high)
    clipped = [q for q in QUANTILES if q != 1.0]
    upper_abs = _tail_quantiles(magnitudes, clipped)
    upper = _tail_quantiles(flat, clipped)
    lower = _tail_quantiles(flat, [1.0 - q for q in clipped])
    for q in QUANTILES:
        bound = top if q == 1.0 else min(top, upper_abs[q])
        out.append((max(bound, 1e-8) / 127.0, 0, q))
        lo = low if q == 1.0 else max(low, lower[1.0 - q])
        hi = high if q == 1.0 else min(high, upper[q])
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # 0.0 must be exact (padding, ReLU zeros)
        scale = max(hi - lo, 1e-8) / 255.0
        zero = int(round(-lo / scale)) - 128
        out.append((scale, max(-128, min(127, zero)), q))
    return out


def _smooth_factor(a_max: Tensor, w_max: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's per-input-channel factor ``max|x|^alpha / max|w|^(1 - alpha)`` (ones at
    ``alpha = 0``), clamped to [1e-4, 1e4]."""
    smooth = (a_max.pow(alpha) / w_max.pow(1.0 - alpha)) if alpha else torch.ones_like(a_max)
    return smooth.clamp(1e-4, 1e4)


def static_int8(weight: Tensor, abs_max: Tensor, rows: Tensor,
                x_min: Tensor | None = None, x_max: Tensor | None = None, *,
                groups: int = 1, channel_size: int = 1,
                alphas: Sequence[float] = ALPHAS) -> StaticInt8:
    """Best (SmoothQuant alpha, range) for ``weight [N, K]`` on input ``rows [R, K * groups]``.

    ``alphas``: the migration strengths tried (``(0.0,)`` keeps the weight's own per-row int8
    codes: a table tied to an output head, whose gathers read the same codes).

    ``abs_max`` (and ``x_min`` / ``x_max`` if given) are per-column extremes over *all*
    calibration rows (``rows`` is a sample), so the unclipped candidates cover every value seen.
    ``groups``: rows of group ``g`` of ``weight`` read columns ``[g * K, (g + 1) * K)`` (a
    grouped convolution); ``channel_size``: consecutive columns sharing one smoothing factor
    (a convolution's kernel area), whose ``in_mult`` is then returned per channel.
    """
    n, k = weight.shape
    weight = weight.float().reshape(groups, n // groups, k)
    grouped = rows.float().reshape(rows.shape[0], groups, k).transpose(0, 1)  # [G, R, K]
    reference = grouped @ weight.transpose(1, 2)  # [G, R, N/G]
    norm = float(reference.pow(2).mean()) or 1.0

    def per_channel(values: Tensor) -> Tensor:  # [G, K] -> one value per channel, repeated
        v = values.reshape(groups, k // channel_size, channel_size).amax(-1, keepdim=True)
        return v.expand(-1, -1, channel_size).reshape(groups, 1, k)

    w_max = per_channel(weight.abs().amax(dim=1)).clamp_min(1e-8)
    a_max = per_channel(abs_max.float().reshape(groups, k)).clamp_min(1e-8)
    lows = (x_min if x_min is not None else rows.amin(0)).float().reshape(groups, 1, k)
    highs = (x_max if x_max is not None else rows.amax(0)).float().reshape(groups, 1, k)
    best: StaticInt8 | None = None
    codes_buf = torch.empty_like(grouped)
    codes_int = torch.empty(grouped.shape, dtype=torch.int8)
    acc = torch.empty(reference.shape, dtype=torch.int32)
    out_buf = torch.empty_like(reference)
    for alpha in alphas:
        smooth = _smooth_factor(a_max, w_max, alpha)
        codes, w_scale = quantize_int8((weight * smooth).reshape(n, k))
        codes_t = codes.reshape(groups, n // groups, k).transpose(1, 2)  # [G, K, N/G] int8
        # sum_k (c - z) w = sum_k c w - z sum_k w: the zero point leaves the integer matmul.
        w_sums = codes_t.sum(1, dtype=torch.int32)  # [G, N/G]
        w_scale_g = w_scale.reshape(groups, 1, n // groups)
        scaled = grouped / smooth
        low, high = float((lows / smooth).min()), float((highs / smooth).max())
        for scale, zero, q in _ranges(scaled, low, high):
            # The activation codes ``clamp(round(x / s) + z)`` (in place, the search's hot
            # loop), multiplied with the weight codes exactly in int32, as the W8A8 kernel
            # does: an int8 matmul costs a quarter of the float one it replaces.
            torch.div(scaled, scale, out=codes_buf).round_().add_(zero).clamp_(-128, 127)
            codes_int.copy_(codes_buf)
            for g in range(groups):
                torch._int_mm(codes_int[g], codes_t[g], out=acc[g])
            if zero:
                acc.sub_(w_sums[:, None, :] * zero)
            out_buf.copy_(acc).mul_(w_scale_g * scale)
            err = float(out_buf.sub_(reference).square_().mean()) / norm
            if best is None or err < best.error:
                in_mult = (1.0 / (smooth * scale)).reshape(-1)[::channel_size]
                best = StaticInt8(codes, in_mult.float().contiguous(),
                                  (scale * w_scale).float(), w_scale.float(), zero, alpha, q,
                                  err)
    assert best is not None
    return best


def dynamic_int8(weight: Tensor, abs_max: Tensor, rows: Tensor,
                 alphas: Sequence[float] = ALPHAS) -> StaticInt8:
    """Best SmoothQuant alpha for ``weight [N, K]`` with per-row (per-token) activation scales
    on input ``rows [R, K]``: each row's codes span its own ``max |x / smooth|`` at run time
    (:func:`slimc.dialect.quantize_rows`), so no calibrated range clips an outlier token and a
    quiet token keeps its resolution. Why: one static scale serves every token, and in small
    LLMs token ranges differ by orders of magnitude (SmolLM2-135M fake-quantized on John,
    W8 per row: a plain static scale 3.5x fp32 perplexity, per token 1.055x, per token +
    SmoothQuant 0.5 1.024x; slimc's searched static scales 1.06x; docs/benchmarks.md,
    session 29). The error is measured as the kernel computes it."""
    from slimc.dialect import quantize_rows

    n, k = weight.shape
    weight, rows = weight.float(), rows.float()
    reference = rows @ weight.t()
    norm = float(reference.pow(2).mean()) or 1.0
    w_max = weight.abs().amax(dim=0).clamp_min(1e-8)
    a_max = abs_max.float().clamp_min(1e-8)
    best: StaticInt8 | None = None
    for alpha in alphas:
        smooth = _smooth_factor(a_max, w_max, alpha)
        codes, w_scale = quantize_int8(weight * smooth)
        in_mult = (1.0 / smooth).float().contiguous()
        x_codes, row_scale = quantize_rows(rows, in_mult)
        out = (x_codes @ codes.float().t()) * w_scale * row_scale
        err = float((out - reference).square().mean()) / norm
        if best is None or err < best.error:
            best = StaticInt8(codes, in_mult, w_scale.float(), w_scale.float(), 0, alpha, 1.0,
                              err, per_row=True)
    assert best is not None
    return best


def _tail_quantiles(values: Tensor, qs: list[float]) -> dict[float, float]:
    """``{q: the k-th smallest of values}`` with ``k = round(q * n)`` for quantiles ``qs`` all in
    the same tail (all above or all below the median), from one partial sort.

    The exact values ``kthvalue(k)`` gives (``torch.quantile`` refuses more than 2**24
    elements), but one ``topk`` of the tail serves every quantile: a ``kthvalue`` per quantile
    cost more than the rest of the search together.
    """
    n = values.numel()
    ks = {q: max(1, min(n, int(round(q * n)))) for q in qs}
    if all(k > n // 2 for k in ks.values()):
        tail = values.topk(n - min(ks.values()) + 1, largest=True, sorted=True).values
        return {q: float(tail[n - k]) for q, k in ks.items()}
    tail = values.topk(max(ks.values()), largest=False, sorted=True).values
    return {q: float(tail[k - 1]) for q, k in ks.items()}


def search_all(jobs: Sequence[Callable[[], StaticInt8]]) -> list[StaticInt8]:
    """Run the per-layer searches ``jobs``, one layer per core with single-threaded ops.

    Each search is many small ops on a ``[rows, K]`` sample; split across intra-op threads
    they spent most of their CPU time synchronising (6x the single-threaded CPU time on a
    loaded 2-core host), while layers are independent (:func:`slimc.jobs.map_single_threaded`).
    """
    return map_single_threaded(lambda job: job(), jobs)
