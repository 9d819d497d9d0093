"""AWQ-style activation-aware scaling (Lin et al., 2024).

A few input channels carry much larger activations than the rest; their weights matter more.
Scaling column ``k`` of ``W`` up by ``s_k`` before rounding (and the input down by ``1/s_k``)
gives those weights finer effective resolution. ``s = mean|x|^alpha`` with ``alpha`` searched on
the calibration rows to minimise the layer's output error. slimc applies ``1/s`` to the input
inside the quantized op (``act_scale``), so no neighbouring op has to absorb it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .formats import Format, fake_quantize


def awq_scale(weight: Tensor, mean_abs: Tensor, rows: Tensor, fmt: Format,
              grid: int = 20) -> tuple[Tensor, float]:
    """Best per-input-channel scale ``s [K]`` for ``weight [N, K]`` and its output error.

    ``rows`` are sample inputs ``[R, K]``; ``alpha = 0`` (``s = 1``, plain RTN) is always a
    candidate, so the result is never worse than round-to-nearest on them.
    """
    reference = rows @ weight.t()
    best_err, best = float("inf"), torch.ones_like(mean_abs)
    base = mean_abs.clamp_min(1e-8)
    for step in range(grid + 1):
        alpha = step / grid
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        approx = (rows / s) @ fake_quantize(weight * s, fmt).t()
        err = float((reference - approx).pow(2).mean())
        if err < best_err:
            best_err, best = err, s
    return best, best_err
