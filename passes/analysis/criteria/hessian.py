"""``sensitivity-hessian``: Hessian trace (HAWQ-v2), by default from the Fisher.

HAWQ ranks layers by ``Tr(H_l) / n_l * ||Q(W_l) - W_l||^2``: the average curvature of the loss
along the layer's weights times the size of the change. The trace comes from
``E[v^T H v]`` over Rademacher vectors ``v``; one Hessian-vector product (double backward) per
sample serves every layer at once, since the blocks of one ``v`` are independent.
The loss is the output's divergence from the uncompressed model (KL for logits, half squared
error otherwise), whose Hessian at the trained weights is the positive semi-definite
Gauss-Newton matrix. A block's share ``v_l . (Hv)_l`` of one probe also holds cross-block
terms, so a layer's estimate can come out slightly negative when its curvature is below the
estimator's noise; damage uses the estimate clipped at zero (the raw value stays in
``extra``). Attention runs in its plain (math) form because
the fused CPU kernel has no second derivative.

That Gauss-Newton matrix *is* the Fisher of the ``taylor`` criterion (labels sampled from the
model's softmax for logits, unit Gaussian output noise otherwise: ``E[g g^T] = J^T H_out J``),
so its trace is the sum of the Fisher diagonal ``taylor`` already computes, with no second
backward pass. ``estimator=fisher`` (the default) reads it from the shared memo
(:func:`~.taylor.fisher_diagonal`); ``estimator=hutchinson`` runs the double-backward
estimator (4 probes per batch; on MiniLM its layer ranking agreed with the Fisher trace's, but
it cost more than the taylor criterion itself).
"""

from __future__ import annotations

from typing import Literal

import torch
from slimc.passes.analysis.criteria.base import SensitivityCriterion, SensitivityOptions
from slimc.passes.analysis.criteria.candidates import Setting
from slimc.passes.analysis.criteria.divergence import output_kind
from slimc.passes.analysis.criteria.execution import (
    calibration_batches,
    differentiable_weights,
    run_graph,
    run_with_grad,
)
from slimc.passes.analysis.criteria.taylor import TaylorOptions, fisher_diagonal
from slimc.passes.analysis.layers import Layer
from torch.nn.attention import SDPBackend, sdpa_kernel

from slimc.ir import IR
from slimc.passmanager import PassContext


class HessianOptions(SensitivityOptions):
    #: ``fisher``: the trace of the taylor criterion's Fisher (shared, no extra backward);
    #: ``hutchinson``: Rademacher probes through a double backward.
    estimator: Literal["fisher", "hutchinson"] = "fisher"
    #: Per calibration batch: Rademacher probes (hutchinson, default 4) or sampled labels
    #: (fisher, default the taylor criterion's, so the two share one computation).
    samples: int | None = None


def divergence_loss(kind: str, output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Summed divergence from ``reference``: zero with zero gradient at the trained weights."""
    if kind == "logits":
        log_p = torch.log_softmax(reference.detach().float(), dim=-1)
        log_q = torch.log_softmax(output.float(), dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum()
    return 0.5 * (output - reference.detach()).pow(2).sum()


def hutchinson_traces(ir: IR, batch: list[torch.Tensor], names: list[str], samples: int,
                      generator: torch.Generator) -> dict[str, float]:
    """Per-weight estimates of ``Tr(H)`` of the divergence loss on one batch."""
    kind = output_kind(ir.output_names[0])
    reference = run_graph(ir, batch)[0]
    leaves = differentiable_weights(ir, names)
    params = [leaves[n] for n in names]
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
        output = run_with_grad(ir, batch, leaves)[0]
    loss = divergence_loss(kind, output, reference)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    pairs = [(n, p, g) for n, p, g in zip(names, params, grads, strict=True) if g is not None]
    traces = dict.fromkeys(names, 0.0)
    for s in range(samples):
        probes = [torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1
                  for _, p, _ in pairs]
        hv = torch.autograd.grad([g for _, _, g in pairs], [p for _, p, _ in pairs],
                                 grad_outputs=probes, retain_graph=s < samples - 1,
                                 allow_unused=True)
        for (n, _, _), v, h in zip(pairs, probes, hv, strict=True):
            if h is not None:
                traces[n] += float((v.double() * h.double()).sum()) / samples
    return traces


class HessianSensitivity(SensitivityCriterion):
    """Layer sensitivity from the Hessian trace (Fisher or Hutchinson, HAWQ-v2) times weight
    error."""

    name = "sensitivity-hessian"
    criterion = "hessian"
    Options = HessianOptions

    def prepare(self, ir: IR, ctx: PassContext, options: SensitivityOptions,
                layers: list[Layer]) -> int:
        assert isinstance(options, HessianOptions)
        names = [layer.weight.name for layer in layers]
        if options.estimator == "fisher":
            samples = options.samples or TaylorOptions.model_fields["samples"].default
            fisher, used = fisher_diagonal(ir, ctx, names, options.max_batches, samples,
                                           options.seed)
            self._trace = {layer.name: float(fisher[layer.weight.name].sum())
                           for layer in layers}
            return used
        batches = calibration_batches(ir, ctx, options.max_batches)
        generator = torch.Generator().manual_seed(options.seed)
        totals = dict.fromkeys(names, 0.0)
        for batch in batches:
            for n, t in hutchinson_traces(ir, batch, names, options.samples or 4,
                                          generator).items():
                totals[n] += t / len(batches)
        self._trace = {layer.name: totals[layer.weight.name] for layer in layers}
        return len(batches)

    def damage(self, layer: Layer, weight: torch.Tensor, compressed: torch.Tensor,
               setting: Setting) -> float:
        mean_curvature = max(self._trace[layer.name], 0.0) / weight.numel()
        return float(mean_curvature * (compressed.double() - weight.double()).pow(2).sum())

    def extra(self, layer: Layer) -> dict[str, float]:
        return {"hessian_trace": self._trace[layer.name]}
