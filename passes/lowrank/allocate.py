"""Heterogeneous ranks from measured sensitivity (``lowrank{allocation=sensitivity}``).

A whitened spectrum says exactly how much *output error of its own layer* each rank costs
(``Σ_{i>r} σ_i²``), but not what that error costs the model: an error in the first blocks or in
the value projections travels through everything after them, one in a late MLP barely shows.
Uniform ranks (SVD-LLM v1) ignore that, and a purely spectral global allocation gives ranks to
whatever layer has the largest numbers. Here, as in ASVD's sensitivity search and SVD-LLM v2's
heterogeneous ranks, the price is *measured*: layers are grouped by role (the layer name with its
block index removed: every ``q_proj``, every ``down_proj`` ...) and by a band of adjacent
blocks; each group alone is truncated to a probe rank and the model's output distortion on
calibration batches, divided by the group's predicted output loss, is that group's weight
``w``. The ranks then minimise ``Σ_l w_l Σ_{i>r_l} σ_{l,i}²`` under the parameter budget: rank
blocks (``round_to`` directions) are removed greedily in the order of least weighted loss per
parameter saved, which is optimal for these convex tails.

``allocation=measured`` (:func:`measured_ranks`) drops the extrapolation: every group is
truncated to several kept fractions, the damage of each is measured, and a multiple-choice
knapsack picks one candidate (or dense) per group.
"""

from __future__ import annotations

import heapq
import re
from collections import defaultdict

import torch

from slimc.ir import IR

from . import factorize

_INDEX = re.compile(r"(?<=[._])\d+(?=[._])")


def role_and_block(name: str) -> tuple[str, int]:
    """``model.layers.7.mlp.down_proj`` -> (``model.layers.*.mlp.down_proj``, 7)."""
    found = _INDEX.search(name)
    if not found:
        return name, 0
    return name[:found.start()] + "*" + name[found.end():], int(found.group())


def groups(names: list[str], bands: int) -> dict[str, list[str]]:
    """Layers of one role split into ``bands`` runs of adjacent blocks."""
    by_role: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for name in names:
        role, block = role_and_block(name)
        by_role[role].append((block, name))
    out = {}
    for role, members in by_role.items():
        members.sort()
        size = -(-len(members) // max(1, min(bands, len(members))))
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            out[f"{role}@{chunk[0][0]}-{chunk[-1][0]}"] = [n for _, n in chunk]
    return out


def _distortion(ir: IR, batches, reference: list[torch.Tensor]) -> float:
    num = den = 0.0
    for batch, ref in zip(batches, reference, strict=True):
        out = ir.run(list(batch))[0].float()
        num += float((out - ref).square().sum())
        den += float(ref.square().sum())
    return num / max(den, 1e-30)


def _kl(ir: IR, batches, reference: list[torch.Tensor]) -> float:
    """Mean over positions of KL(dense ‖ truncated) of the softmax over the last dimension
    (``reference``: the dense model's log-probabilities)."""
    total, count = 0.0, 0
    for batch, ref in zip(batches, reference, strict=True):
        logp = torch.log_softmax(ir.run(list(batch))[0].float(), dim=-1)
        total += float((ref.exp() * (ref - logp)).sum())
        count += ref.numel() // max(1, ref.shape[-1])
    return total / max(count, 1)


def _measure(ir: IR, batches, metric: str = "l2"):
    """``damage()``: the model's output change on ``batches`` since this call (``l2``:
    relative squared error of output 0; ``kl``: mean KL of its softmax, for logits)."""
    batches = list(batches)
    if metric == "kl":
        reference = [torch.log_softmax(ir.run(list(b))[0].float(), dim=-1) for b in batches]
        return lambda: _kl(ir, batches, reference)
    reference = [ir.run(list(b))[0].float() for b in batches]
    return lambda: _distortion(ir, batches, reference)


def _truncated(ir: IR, by_name: dict, spec: dict, ranks: dict[str, int], damage) -> float:
    """``damage()`` with each layer of ``ranks`` replaced by its rank-r product; the dense
    weights are restored afterwards."""
    saved = {}
    try:
        for name, r in ranks.items():
            u, v = spec[name].factors(r)
            layer = by_name[name]
            saved[name] = ir.get_weight(layer.weight)
            ir.set_weight(layer.weight, layer.from_matrix(u @ v).to(saved[name].dtype))
        return damage()
    finally:
        for name, value in saved.items():
            ir.set_weight(by_name[name].weight, value)


def sensitivity_weights(ir: IR, layers: list, spec: dict, shapes: dict, batches,
                        probe_keep: float, round_to: int, bands: int) -> dict[str, float]:
    """Per layer: model-output distortion per unit of predicted layer-output loss, measured
    per group (role x band) with the group alone truncated to ``probe_keep`` of its
    parameters. Layers are restored afterwards."""
    damage = _measure(ir, batches)
    by_name = {la.name: la for la in layers}
    weights = {}
    for members in groups([n for n in spec if n in by_name], bands).values():
        ranks = {}
        for name in members:
            n, k = shapes[name]
            ranks[name] = max(round_to, factorize.rank_for_ratio(n, k, probe_keep, round_to))
        predicted = sum(float(spec[n].s[r:].double().square().sum()) for n, r in ranks.items())
        measured = _truncated(ir, by_name, spec, ranks, damage)
        w = max(measured, 1e-12) / max(predicted, 1e-30)
        weights.update({name: w for name in members})
    return weights


def measured_ranks(ir: IR, layers: list, spec: dict, shapes: dict, batches,
                   keeps: list[float], round_to: int, bands: int, goal: float, worth,
                   metric: str = "l2") -> tuple[dict[str, int], dict]:
    """``allocation=measured``: ranks from the model's damage *measured* at each candidate.

    Each group (role x band of blocks) alone is truncated to each kept fraction of
    ``keeps`` (ranks rounded as the pass rounds them; a layer whose rank ``worth`` vetoes
    stays dense in that candidate) and the model's output damage on ``batches`` is measured;
    per group one candidate, dense included, is then chosen so that at least ``goal``
    parameters are removed at the least summed damage (damage assumed additive across groups:
    the multiple-choice knapsack of ``quantize{mixed}``, :func:`slimc.passes.quantize.mixed.
    solve`). Unlike ``sensitivity`` nothing is extrapolated from one probe, and a group whose
    every cut hurts can stay dense. When even the smallest candidates cannot remove ``goal``
    the largest removal the candidates allow is taken (the summary's params say so).
    Returns the ranks and, per group, its candidates' kept fraction, removed params and damage.
    """
    import numpy as np
    from slimc.passes.quantize.mixed import solve

    damage = _measure(ir, batches, metric)
    by_name = {la.name: la for la in layers}
    grps = groups([n for n in spec if n in by_name], bands)
    total = {g: sum(shapes[n][0] * shapes[n][1] for n in members)
             for g, members in grps.items()}
    cands: dict[str, list[tuple[float, dict[str, int], int, float]]] = {}
    for g, members in grps.items():
        cands[g] = [(1.0, {}, 0, 0.0)]
        for keep in sorted(set(keeps), reverse=True):
            ranks = {}
            for name in members:
                n, k = shapes[name]
                r = factorize.rank_for_ratio(n, k, keep, round_to)
                if worth(name, r) is None:
                    ranks[name] = r
            if not ranks or any(ranks == c[1] for c in cands[g]):
                continue
            removed = sum(shapes[n][0] * shapes[n][1] - r * sum(shapes[n])
                          for n, r in ranks.items())
            cands[g].append((keep, ranks, removed,
                             _truncated(ir, by_name, spec, ranks, damage)))
    names = list(grps)
    width = max(len(c) for c in cands.values())
    costs = np.zeros((len(names), width))
    dmg = np.zeros((len(names), width))
    for i, g in enumerate(names):
        padded = cands[g] + [cands[g][0]] * (width - len(cands[g]))  # dense again
        costs[i] = [total[g] - c[2] for c in padded]
        dmg[i] = [c[3] for c in padded]
    budget = max(sum(total.values()) - goal, float(costs.min(axis=1).sum()))
    picks = solve(costs, dmg, budget) if names else []
    ranks: dict[str, int] = {}
    report = {}
    for i, g in enumerate(names):
        keep, chosen, removed, dm = (cands[g] + [cands[g][0]] * width)[picks[i]]
        ranks.update(chosen)
        report[g] = {"chosen": keep, "candidates": {
            f"{c[0]:g}": {"removed": c[2], "damage": float(f"{c[3]:.4g}")} for c in cands[g][1:]}}
    return ranks, report


def weighted_ranks(spec: dict, shapes: dict, weights: dict[str, float], goal: float,
                   round_to: int, worth) -> dict[str, int]:
    """Greedy minimum of ``Σ w_l · loss_l(r_l)`` removing at least ``goal`` parameters; a
    layer enters at its largest useful rank (the first step saves ``N·K − r₀(N+K)``), then
    loses ``round_to`` directions at a time. ``worth(name, r)`` vetoes a rank."""
    def loss(name: str, r: int) -> float:
        return float(spec[name].s[r:].double().square().sum())

    heap, ranks, removed = [], {}, 0
    for name in spec:
        n, k = shapes[name]
        r0 = int(factorize.max_useful_rank(n, k)) // round_to * round_to
        if r0 * (n + k) >= n * k:
            r0 -= round_to
        if r0 < round_to or worth(name, r0) is not None:
            continue
        saved = n * k - r0 * (n + k)
        heapq.heappush(heap, (weights[name] * loss(name, r0) / saved, name, r0, saved))
    while heap and removed < goal:
        _, name, r, saved = heapq.heappop(heap)
        ranks[name] = r
        removed += saved
        nxt = r - round_to
        if nxt >= round_to and worth(name, nxt) is None:
            n, k = shapes[name]
            step = round_to * (n + k)
            cost = weights[name] * (loss(name, nxt) - loss(name, r))
            heapq.heappush(heap, (cost / step, name, nxt, step))
    return ranks
