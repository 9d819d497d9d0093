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


def sensitivity_weights(ir: IR, layers: list, spec: dict, shapes: dict, batches,
                        probe_keep: float, round_to: int, bands: int) -> dict[str, float]:
    """Per layer: model-output distortion per unit of predicted layer-output loss, measured
    per group (role x band) with the group alone truncated to ``probe_keep`` of its
    parameters. Layers are restored afterwards."""
    batches = list(batches)
    reference = [ir.run(list(b))[0].float() for b in batches]
    by_name = {la.name: la for la in layers}
    weights = {}
    for members in groups([n for n in spec if n in by_name], bands).values():
        saved, predicted = {}, 0.0
        for name in members:
            n, k = shapes[name]
            r = max(round_to, factorize.rank_for_ratio(n, k, probe_keep, round_to))
            sp = spec[name]
            u, v = sp.factors(r)
            layer = by_name[name]
            saved[name] = ir.get_weight(layer.weight)
            ir.set_weight(layer.weight, layer.from_matrix(u @ v).to(saved[name].dtype))
            predicted += float(sp.s[r:].double().square().sum())
        try:
            measured = _distortion(ir, batches, reference)
        finally:
            for name, value in saved.items():
                ir.set_weight(by_name[name].weight, value)
        w = max(measured, 1e-12) / max(predicted, 1e-30)
        weights.update({name: w for name in members})
    return weights


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
