"""Unit importance: magnitude or activation-aware (|W|·‖X‖), plus activation statistics.

Hand-off note: ``passes/analysis/sensitivity.py`` (the sensitivity analysis) scores *layers*;
pruning needs per-*unit* scores inside coupled groups, so this module computes them itself
from the same ingredients (weights and activations recorded by :func:`slimc.observe.observe` over
the IR on the calibration/example inputs). When sensitivity grows a per-channel API, the
``criterion`` option can route there.

Activation-aware score of a unit = Σ over the consumer weights it feeds (linear/conv inputs) of
Σ_j ‖W[:, j]‖² · E[x_j²]: the expected squared output contribution of its input channels
(Wanda/FLAP). Magnitude = Σ of squared weights over every slice the unit owns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from slimc.passes.prune.groups import Group, PruneGroups, Unit
from slimc.passes.prune.labels import CONV_OPS, op_name
from torch.fx import Node

from slimc.ir import IR
from slimc.observe import observe


@dataclass
class InputStats:
    """Statistics of one consumer's input channels over the calibration data."""

    sq: torch.Tensor
    total: torch.Tensor
    count: int = 0
    gram: torch.Tensor | None = None
    #: block inputs/outputs for block influence (cosine)
    extra: dict = field(default_factory=dict)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.sq / max(self.count, 1)


def consumer_axis(node: Node) -> tuple[int, int, int] | None:
    """(weight arg index, weight input axis, activation channel dim) of a consumer op."""
    op = op_name(node)
    if op == "aten.linear":
        return 1, 1, -1
    if op == "aten.addmm":
        return 2, 0, -1
    if op in ("aten.mm", "aten.matmul"):
        return 1, 0, -1
    if op in CONV_OPS:
        return 1, 1, 1
    return None


def consumers(ir: IR) -> dict[str, Node]:
    """Weight placeholder name -> the consumer op reading it as a linear/conv weight."""
    out = {}
    for node in ir.nodes("call_function"):
        spec = consumer_axis(node)
        if spec is None or len(node.args) <= spec[0]:
            continue
        weight = node.args[spec[0]]
        if isinstance(weight, Node) and weight.op == "placeholder":
            out.setdefault(weight.name, node)
    return out


@torch.no_grad()
def record(ir: IR, batches: Sequence[Sequence[torch.Tensor]], *, gram: set[str] = frozenset(),
           keep: set[str] = frozenset()) -> tuple[dict[str, InputStats], dict[str, list]]:
    """Input-channel statistics of every consumer op (Gram matrices for ``gram`` nodes) and the
    raw outputs of ``keep`` nodes, over ``batches`` of user inputs."""
    stats: dict[str, InputStats] = {}
    kept: dict[str, list[torch.Tensor]] = {}

    def input_stats(dim: int):
        def fn(n: Node, args: tuple, result) -> None:
            x = args[1] if op_name(n) == "aten.addmm" else args[0]
            flat = x.detach().float().movedim(dim, -1).reshape(-1, x.shape[dim])
            st = stats.get(n.name)
            if st is None:
                zeros = torch.zeros(flat.shape[1], dtype=torch.float64)
                st = stats[n.name] = InputStats(zeros, zeros.clone())
            # float32 products, float64 accumulation: a full float64 copy of every
            # activation was the slowest part of recording.
            st.sq += flat.square().sum(0, dtype=torch.float64)
            st.total += flat.sum(0, dtype=torch.float64)
            st.count += flat.shape[0]
            if n.name in gram:
                g = (flat.T @ flat).double()
                st.gram = g if st.gram is None else st.gram + g
        return fn

    def keep_output(n: Node, args: tuple, result) -> None:
        if isinstance(result, torch.Tensor):
            kept.setdefault(n.name, []).append(result.detach().float())

    observers: dict[str, list] = {}
    for node in ir.nodes("call_function"):
        spec = consumer_axis(node)
        if spec is not None:
            observers.setdefault(node.name, []).append(input_stats(spec[2]))
    for name in keep:
        observers.setdefault(name, []).append(keep_output)
    observe(ir, batches, observers)
    return stats, kept


def unit_scores(ir: IR, group: Group, criterion: str,
                stats: dict[str, InputStats] | None) -> torch.Tensor:
    """One score per unit of ``group`` (higher = more important)."""
    weights = {n.name: n for n in ir.nodes("placeholder")}
    cons = consumers(ir)
    scores = torch.zeros(len(group.units), dtype=torch.float64)
    for (wname, axis) in group.extents:
        w = ir.get_weight(weights[wname]).detach().double()
        consumer = cons.get(wname)
        spec = consumer_axis(consumer) if consumer is not None else None
        is_input = spec is not None and spec[1] == axis
        if criterion == "activation" and not is_input:
            continue
        per = (w.movedim(axis, 0).reshape(w.shape[axis], -1) ** 2).sum(1)
        if criterion == "activation":
            st = (stats or {}).get(consumer.name)
            if st is None:
                continue
            per = per * st.mean_sq
        scores += torch.stack([per[u.slices[(wname, axis)]].sum() for u in group.units])
    if criterion == "activation" and bool((scores == 0).all()):
        return unit_scores(ir, group, "magnitude", stats)
    return scores


def score_groups(ir: IR, result: PruneGroups, groups: list[Group], criterion: str,
                 batches: Sequence[Sequence[torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Scores per group index; activation-aware criteria record activations once."""
    stats = record(ir, batches)[0] if criterion == "activation" else None
    return {g.index: unit_scores(ir, g, criterion, stats) for g in groups}


def unit_key(unit: Unit) -> int:
    return unit.root
