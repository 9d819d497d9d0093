"""``sensitivity-magnitude``: relative weight-space error, data-free.

The cheapest criterion: a layer is as sensitive as the fraction of its weight energy a
compression destroys, ``||C(W) - W||^2 / ||W||^2``. It ignores what the layer's inputs look like
and how errors propagate, which is exactly what the data-aware criteria add; comparing them
shows where that matters (e.g. layers fed by outlier activation channels).
"""

from __future__ import annotations

import torch
from slimc.passes.analysis.criteria.base import SensitivityCriterion
from slimc.passes.analysis.criteria.candidates import Setting
from slimc.passes.analysis.layers import Layer


class MagnitudeSensitivity(SensitivityCriterion):
    """Layer sensitivity from weights alone: relative weight error of each compression."""

    name = "sensitivity-magnitude"
    criterion = "magnitude"
    data_aware = False

    def damage(self, layer: Layer, weight: torch.Tensor, compressed: torch.Tensor,
               setting: Setting) -> float:
        w = weight.double()
        return float((compressed.double() - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))
