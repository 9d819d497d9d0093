"""Sequential whitened factorization with a closed-form refit (``lowrank{sequential=true}``).

One-shot SVD-LLM whitens every layer with the activations of the *dense* model, but after
compression each layer receives the outputs of the already-truncated layers before it, and the
errors compound through depth. Here the layers are factorized in graph order, stage by stage
(all layers reading one activation: q/k/v, then o, then gate/up, then down ...), each on
calibration activations that went through the compressed layers before it
(:class:`slimc.observe.StagedRun`, one forward pass in all), and each is fitted to what the
*dense* model computed there:

    min over rank-r W'   ‖X_o Wᵀ − X_c W'ᵀ‖²     (X_o: dense-model inputs, X_c: compressed)

has the closed form ``W' = truncate_r(W*)`` in the metric of ``X_cᵀX_c``, with the
least-squares map ``W* = W (X_oᵀX_c)(X_cᵀX_c)⁻¹`` (the refit of the layer to the dense outputs;
for ``X_c = X_o`` it is ``W`` and this is SVD-LLM): the truncation-aware SVD of ``W* S``
(``S Sᵀ = X_cᵀX_c``) gives the factors, and the loss is again ``Σ_{i>r} σ_i²`` plus what no
full-rank map could recover.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.fx import Node

from slimc.ir import IR
from slimc.observe import StagedRun

from . import factorize

#: Ridge of the least-squares refit, relative to the mean diagonal of ``X_cᵀX_c``: keeps W*
#: near W along directions the calibration data barely reaches.
REFIT_RIDGE = 1e-3


def input_node(layer) -> Node | None:
    """The one activation a linear layer multiplies (None: several, or none)."""
    nodes = {use.node.args[use.input_arg] for use in layer.uses if use.input_arg is not None}
    return nodes.pop() if len(nodes) == 1 else None


@factorize._serial
def refit(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """``W (X_oᵀX_c)(X_cᵀX_c + λI)⁻¹``."""
    g = gram.double()
    lam = REFIT_RIDGE * float(g.diagonal().mean() or 1.0)
    # ridge toward W itself: (W C + λW)(G + λI)⁻¹, so unreached directions keep W
    lhs = g + lam * torch.eye(g.shape[0], dtype=g.dtype)
    rhs = weight.double() @ (cross.double() + lam * torch.eye(g.shape[0], dtype=g.dtype))
    return torch.linalg.solve(lhs, rhs.T).T  # lhs symmetric


def factorize_sequentially(ir: IR, layers: list, ranks: dict, batches, factor_layer,
                           skipped: dict[str, str]) -> dict:
    """Factorize ``layers`` (those in ``ranks``) stage by stage; ``factor_layer(layer, spec,
    rank)`` rewrites one. Returns ``{name: spectrum}`` of the factorized layers."""
    dense = ir.clone()
    by_name = {n.name: n for n in dense.graph.nodes}
    stages: dict[Node, list] = defaultdict(list)
    for layer in layers:
        if layer.name not in ranks:
            continue
        node = input_node(layer)
        if node is None:
            skipped[layer.name] = "sequential: the weight multiplies several activations"
            continue
        stages[node].append(layer)
    order = {n: i for i, n in enumerate(ir.graph.nodes)}
    compressed, reference = StagedRun(ir, batches), StagedRun(dense, batches)
    done = {}
    for node in sorted(stages, key=order.__getitem__):
        xc = compressed.advance_to(node)
        xo = reference.advance_to(by_name[node.name])
        k = xc[0].shape[-1]
        gram = torch.zeros(k, k, dtype=torch.float64)
        cross = torch.zeros(k, k, dtype=torch.float64)
        for c, o in zip(xc, xo, strict=True):
            c = c.reshape(-1, k).float()
            o = o.reshape(-1, k).float()
            gram += (c.T @ c).double()
            cross += (o.T @ c).double()
        del xc, xo
        for layer in stages[node]:
            try:
                target = refit(layer.matrix(ir), gram, cross)
                spec = factorize.whitened(target, gram)
            except (ValueError, torch.linalg.LinAlgError) as exc:
                skipped[layer.name] = f"factorization failed: {exc}"
                continue
            factor_layer(layer, spec, ranks[layer.name])
            done[layer.name] = spec
    return done
