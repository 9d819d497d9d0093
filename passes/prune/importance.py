"""Unit importance: magnitude or activation-aware (|W|·‖X‖), plus activation statistics.

Hand-off note: ``passes/analysis/sensitivity.py`` (the sensitivity analysis) scores *layers*;
pruning needs per-*unit* scores inside coupled groups, so this module computes them itself
from the same ingredients (weights and activations recorded by a ``torch.fx.Interpreter`` over
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
from torch.export.graph_signature import InputKind
from torch.fx import Interpreter, Node

from slimc.ir import IR


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


def input_values(ir: IR, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    values, user = [], iter(inputs)
    for spec in ir.program.graph_signature.input_specs:
        values.append(next(user) if spec.kind == InputKind.USER_INPUT
                      else ir._state_value(spec))
    return values


class _Recorder(Interpreter):
    def __init__(self, ir: IR, watch: dict[str, int], gram: set[str],
                 keep: set[str]) -> None:
        super().__init__(ir.graph_module)
        self.watch, self.gram, self.keep = watch, gram, keep
        self.stats: dict[str, InputStats] = {}
        self.kept: dict[str, list[torch.Tensor]] = {}

    def run_node(self, n: Node):
        result = super().run_node(n)
        if n.name in self.watch:
            x = self.env[n.args[0]] if op_name(n) != "aten.addmm" else self.env[n.args[1]]
            dim = self.watch[n.name]
            flat = x.detach().float().movedim(dim, -1).reshape(-1, x.shape[dim])
            st = self.stats.get(n.name)
            if st is None:
                zeros = torch.zeros(flat.shape[1], dtype=torch.float64)
                st = self.stats[n.name] = InputStats(zeros, zeros.clone())
            # float32 products, float64 accumulation: a full float64 copy of every
            # activation was the slowest part of recording.
            st.sq += flat.square().sum(0, dtype=torch.float64)
            st.total += flat.sum(0, dtype=torch.float64)
            st.count += flat.shape[0]
            if n.name in self.gram:
                g = (flat.T @ flat).double()
                st.gram = g if st.gram is None else st.gram + g
        if n.name in self.keep and isinstance(result, torch.Tensor):
            self.kept.setdefault(n.name, []).append(result.detach().float())
        return result


@torch.no_grad()
def record(ir: IR, batches: Sequence[Sequence[torch.Tensor]], *, gram: set[str] = frozenset(),
           keep: set[str] = frozenset()) -> tuple[dict[str, InputStats], dict[str, list]]:
    """Input-channel statistics of every consumer op (Gram matrices for ``gram`` nodes) and the
    raw outputs of ``keep`` nodes, over ``batches`` of user inputs."""
    watch = {}
    for node in ir.nodes("call_function"):
        spec = consumer_axis(node)
        if spec is not None:
            watch[node.name] = spec[2]
    rec = _Recorder(ir, watch, set(gram), set(keep))
    for batch in batches:
        rec.run(*input_values(ir, batch))
    return rec.stats, rec.kept


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
