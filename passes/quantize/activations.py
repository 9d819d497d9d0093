"""Static int8 activations for int8-weight linears (W8A8), calibrated per layer.

A W8A8 linear quantizes its input with one fixed scale (no run-time range search) and runs the
matmul in integers (``slimc::linear_w8a8``). Two choices decide its accuracy, and both are
searched on the calibration rows that enter the layer, minimising the layer's output error:

* **SmoothQuant migration** (Xiao et al., 2023): a few input channels carry activations far
  larger than the rest, which a per-tensor scale cannot resolve. Dividing channel ``k`` of the
  input by ``s_k = max|x_k|^alpha / max|w_k|^(1-alpha)`` and multiplying column ``k`` of the
  weight by it moves that range into the per-row-quantized weight; ``alpha = 0`` keeps the
  layer as is. The division is folded into the op's ``in_mult``, so no other op changes.
* **Clipping**: the per-tensor range is the largest ``|x|`` seen or a high quantile of it;
  clipping rare outliers buys resolution for everything else.

The calibrated scale is also why W8A8 needs representative ``--calib`` data: inputs far outside
the calibrated range are clipped at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .formats import quantize_int8

#: SmoothQuant migration strengths tried per layer (0 = no migration).
ALPHAS = (0.0, 0.25, 0.5, 0.75)
#: Clipping candidates: quantiles of |x| on the calibration sample (1.0 = the largest seen).
QUANTILES = (1.0, 0.99999, 0.9999, 0.999)


@dataclass
class StaticInt8:
    """The packed tensors of one W8A8 linear and what the search chose."""

    weight: Tensor  # int8 [N, K]
    in_mult: Tensor  # f32 [K]: 1 / (smooth_k * input_scale)
    out_scale: Tensor  # f32 [N]: input_scale * weight_scale_n
    alpha: float
    clip: float  # clipping range over the largest |x| seen
    error: float  # relative output error on the calibration rows

    def tensors(self) -> dict[str, Tensor]:
        return {"weight": self.weight, "in_mult": self.in_mult, "out_scale": self.out_scale}


def static_int8(weight: Tensor, abs_max: Tensor, rows: Tensor) -> StaticInt8:
    """Best (SmoothQuant alpha, clipping range) for ``weight [N, K]`` on input ``rows [R, K]``.

    ``abs_max`` is the per-channel maximum over *all* calibration rows (``rows`` is a sample),
    so the unclipped candidate covers every value seen.
    """
    weight = weight.float()
    reference = rows @ weight.t()
    norm = float(reference.pow(2).mean()) or 1.0
    w_max = weight.abs().amax(dim=0).clamp_min(1e-8)
    x_max = abs_max.float().clamp_min(1e-8)
    best: StaticInt8 | None = None
    for alpha in ALPHAS:
        smooth = (x_max.pow(alpha) / w_max.pow(1.0 - alpha)) if alpha else torch.ones_like(x_max)
        smooth = smooth.clamp(1e-4, 1e4)
        codes, w_scale = quantize_int8(weight * smooth)
        dequant = codes.float() * w_scale[:, None]
        scaled = rows / smooth
        top = float((x_max / smooth).max())
        magnitudes = scaled.abs().flatten()
        for q in QUANTILES:
            bound = top if q == 1.0 else min(top, float(_quantile(magnitudes, q)))
            scale = max(bound, 1e-8) / 127.0
            a = torch.clamp(torch.round(scaled / scale), -127, 127)
            err = float((reference - (a * scale) @ dequant.t()).pow(2).mean()) / norm
            if best is None or err < best.error:
                best = StaticInt8(codes, (1.0 / (smooth * scale)).float(),
                                  (scale * w_scale).float(), alpha, bound / top, err)
    assert best is not None
    return best


def _quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile`` refuses more than 2**24 elements: use ``kthvalue`` instead."""
    k = max(1, min(values.numel(), int(round(q * values.numel()))))
    return values.kthvalue(k).values
