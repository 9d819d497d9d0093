"""``sensitivity-taylor``: Fisher-weighted weight error (first-order Taylor / Fisher).

The loss change of a small weight change is, to second order around a trained model,
``1/2 dW^T F dW`` with ``F`` the Fisher information; its diagonal is the expected squared
gradient ``E[g^2]``. Gradients are taken on calibration batches with labels *sampled from the
model's own prediction* (softmax for logits; unit Gaussian noise for embeddings and other
outputs), which makes ``E[g^2]`` the true Fisher rather than the biased empirical one, and needs
no labels.
"""

from __future__ import annotations

import torch
from slimc.passes.analysis.criteria.base import SensitivityCriterion, SensitivityOptions
from slimc.passes.analysis.criteria.candidates import Setting
from slimc.passes.analysis.criteria.divergence import output_kind
from slimc.passes.analysis.criteria.execution import (
    calibration_batches,
    differentiable_weights,
    run_with_grad,
)
from slimc.passes.analysis.layers import Layer

from slimc.ir import IR
from slimc.passmanager import PassContext


class TaylorOptions(SensitivityOptions):
    #: Label samples drawn per calibration batch (each one backward pass).
    samples: int = 2


def sampled_label_loss(kind: str, output: torch.Tensor, generator: torch.Generator):
    """A loss whose gradient, with labels drawn from the model, has covariance = Fisher."""
    if kind == "logits":
        logits = output.reshape(-1, output.shape[-1]).float()
        labels = torch.multinomial(logits.detach().softmax(-1), 1, generator=generator)
        return torch.nn.functional.cross_entropy(logits, labels.view(-1), reduction="sum")
    noise = torch.randn(output.shape, generator=generator, dtype=output.dtype)
    return (output * noise).sum()


class TaylorSensitivity(SensitivityCriterion):
    """Layer sensitivity from Fisher-weighted weight error (gradients on calibration data)."""

    name = "sensitivity-taylor"
    criterion = "taylor"
    Options = TaylorOptions

    def prepare(self, ir: IR, ctx: PassContext, options: SensitivityOptions,
                layers: list[Layer]) -> int:
        assert isinstance(options, TaylorOptions)
        batches = calibration_batches(ir, ctx, options.max_batches)
        kind = output_kind(ir.output_names[0])
        generator = torch.Generator().manual_seed(options.seed)
        names = [layer.weight.name for layer in layers]
        fisher = {n: torch.zeros_like(ir.weights()[n], dtype=torch.float64) for n in names}
        draws = 0
        for batch in batches:
            leaves = differentiable_weights(ir, names)
            output = run_with_grad(ir, batch, leaves)[0]
            for s in range(options.samples):
                loss = sampled_label_loss(kind, output, generator)
                grads = torch.autograd.grad(loss, [leaves[n] for n in names],
                                            retain_graph=s < options.samples - 1,
                                            allow_unused=True)
                for n, g in zip(names, grads, strict=True):
                    if g is not None:
                        fisher[n] += g.double().pow(2)
                draws += 1
        self._fisher = {layer.name: layer.canonical(fisher[layer.weight.name] / draws)
                        for layer in layers}
        return len(batches)

    def damage(self, layer: Layer, weight: torch.Tensor, compressed: torch.Tensor,
               setting: Setting) -> float:
        delta = compressed.double() - weight.double()
        return float(0.5 * (self._fisher[layer.name] * delta.pow(2)).sum())

    def extra(self, layer: Layer) -> dict[str, float]:
        return {"fisher_trace": float(self._fisher[layer.name].sum())}
