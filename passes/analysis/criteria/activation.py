"""``sensitivity-activation``: weight error scaled by input activation norms (Wanda / AWQ).

A weight that multiplies a large activation matters more: the error a layer adds to its output
is ``||(C(W) - W) X||``, which, ignoring correlations between input features, is
``sum_ij (dW_ij * ||X_j||)^2``. Scores are relative to ``sum_ij (W_ij * ||X_j||)^2`` so layers of
different scale compare. ``||X_j||`` is recorded on calibration data by `slimc.observe`.
"""

from __future__ import annotations

import torch
from slimc.passes.analysis.criteria.base import SensitivityCriterion, SensitivityOptions
from slimc.passes.analysis.criteria.candidates import Setting
from slimc.passes.analysis.criteria.execution import ActivationRecorder, calibration_batches
from slimc.passes.analysis.layers import Layer

from slimc.ir import IR
from slimc.passmanager import PassContext


def input_scale(layer: Layer | str, weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """``||X_j||`` broadcast to ``weight``'s shape (per input feature / channel / row).

    ``layer`` is the layer or the kind of the op that read the weight (``linear``, ``conv``,
    ``embedding``): a tied weight is read as an embedding *and* as a linear LM head.
    ``weight`` is canonical (inputs on the last axis for linears and experts).
    """
    kind = layer if isinstance(layer, str) else _ROLE_KIND.get(layer.kind, layer.kind)
    norm = sq_norm.sqrt().to(torch.float64)
    if kind == "embedding":
        return norm.view(-1, *([1] * (weight.dim() - 1)))
    if kind == "linear":
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
        uses = [use for layer in layers for use in layer.uses]
        recorder = ActivationRecorder(ir, [use.node for use in uses], inputs={
            use.node.name: (use.input_arg, use.feature_dim) for use in uses})
        for batch in batches:
            recorder.record(batch)
        # Per layer and per kind of use (a tied weight is an embedding and an LM head).
        self._sq_norms: dict[str, dict[str, torch.Tensor]] = {}
        for layer in layers:
            per_kind: dict[str, torch.Tensor] = {}
            for use in layer.uses:
                kind = _ROLE_KIND.get(use.role, use.role)
                per_kind[kind] = per_kind.get(kind, 0) + recorder.sq_norms[use.node.name]
            self._sq_norms[layer.name] = per_kind
        return len(batches)

    def damage(self, layer: Layer, weight: torch.Tensor, compressed: torch.Tensor,
               setting: Setting) -> float:
        w = weight.double()
        delta = compressed.double() - w
        error = total = 0.0
        for kind, sq_norm in self._sq_norms[layer.name].items():
            scale = input_scale(kind, weight, sq_norm)
            error += float((delta * scale).pow(2).sum())
            total += float((w * scale).pow(2).sum())
        return error / max(total, 1e-30)


#: How a use's input norms broadcast over the canonical weight (see :func:`input_scale`).
_ROLE_KIND = {"right": "linear", "expert": "linear", "conv_transpose": "conv"}
