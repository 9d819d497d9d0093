"""``sensitivity-activation``: weight error scaled by input activation norms (Wanda / AWQ).

A weight that multiplies a large activation matters more: the error a layer adds to its output
is ``||(C(W) - W) X||``, which, ignoring correlations between input features, is
``sum_ij (dW_ij * ||X_j||)^2``. Scores are relative to ``sum_ij (W_ij * ||X_j||)^2`` so layers of
different scale compare. ``||X_j||`` is recorded on calibration data by an fx Interpreter.
"""

from __future__ import annotations

import torch
from slimc.passes.analysis.criteria.base import SensitivityCriterion, SensitivityOptions
from slimc.passes.analysis.criteria.candidates import Setting
from slimc.passes.analysis.criteria.execution import ActivationRecorder, calibration_batches
from slimc.passes.analysis.layers import Layer

from slimc.ir import IR
from slimc.passmanager import PassContext


def input_scale(layer: Layer, weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """``||X_j||`` broadcast to ``weight``'s shape (per input feature / channel / row)."""
    norm = sq_norm.sqrt().to(torch.float64)
    if layer.kind == "embedding":
        return norm.view(-1, *([1] * (weight.dim() - 1)))
    if layer.kind == "linear":
        return norm.view(*([1] * (weight.dim() - 1)), -1)
    out_ch, in_per_group = weight.shape[0], weight.shape[1]
    groups = norm.numel() // in_per_group
    per_group = norm.view(groups, 1, in_per_group)
    scale = per_group.expand(groups, out_ch // groups, in_per_group).reshape(out_ch, in_per_group)
    return scale.view(out_ch, in_per_group, *([1] * (weight.dim() - 2)))


class ActivationSensitivity(SensitivityCriterion):
    """Layer sensitivity from weight error times input activation norms (Wanda/AWQ)."""

    name = "sensitivity-activation"
    criterion = "activation"

    def prepare(self, ir: IR, ctx: PassContext, options: SensitivityOptions,
                layers: list[Layer]) -> int:
        batches = calibration_batches(ir, ctx, options.max_batches)
        recorder = ActivationRecorder(ir, [op for layer in layers for op in layer.ops])
        for batch in batches:
            recorder.record(batch)
        self._sq_norms = {layer.name: sum(recorder.sq_norms[op.name] for op in layer.ops)
                          for layer in layers}
        return len(batches)

    def damage(self, layer: Layer, weight: torch.Tensor, compressed: torch.Tensor,
               setting: Setting) -> float:
        scale = input_scale(layer, weight, self._sq_norms[layer.name])
        w = weight.double()
        error = ((compressed.double() - w) * scale).pow(2).sum()
        return float(error / (w * scale).pow(2).sum().clamp_min(1e-30))
