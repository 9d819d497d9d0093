"""Sensitivity per prunable group: attention heads, MLP neurons, conv filters, whole blocks.

The groups are the ``prune-groups`` analysis' (:mod:`slimc.passes.prune.groups`): a group is a
set of interchangeable units (the heads of one attention, the neurons of one MLP), each unit
owning slices of several weights (a head: rows of q/k/v and columns of o). For each candidate
keep ratio the lowest-magnitude units are removed -- every slice they own set to zero, which
removes the unit's contribution exactly (its output, e.g. ``softmax(qk) v_h`` through zeroed
``v``/``o`` slices, or ``act(0) * 0``, is zero) -- and the criterion scores the change. A block
(a residual branch ``x + f(x)``) is scored dropped whole (``keep0``): the perturbation criterion
runs the graph with each of its residual adds returning the skip input; proxy criteria sum their
per-layer damage over the block's weights zeroed.

``residual`` groups (hidden channels shared by every layer through the norms) are not scored
by default: zeroing them is not the same as removing them (a LayerNorm's statistics change).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Interpreter

from slimc.ir import IR
from slimc.passmanager import PassContext

#: Group kinds scored by default.
DEFAULT_KINDS = ("attention-head", "kv-group", "mlp-channel", "conv-filter")


@dataclass
class GroupSensitivity:
    """Damage of one group (or block) at each candidate keep ratio (``keep0``: removed)."""

    name: str
    kind: str
    module_path: str
    units: int
    unit_width: int
    #: Scalars owned by all units together (what pruning the whole group would remove).
    params: int
    #: setting key (``keep0.75`` ...; blocks: ``keep0``) -> damage; larger = more sensitive.
    curve: dict[str, float]
    #: Units removed at each setting, lowest magnitude first (``keep0.5`` -> unit indices).
    removed: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class GroupCandidate:
    """What to override to score one group at one setting."""

    name: str
    kind: str
    module_path: str
    units: int
    unit_width: int
    params: int
    #: setting key -> removed unit indices (blocks: ``keep0`` -> [0]).
    settings: dict[str, list[int]]
    #: The prune-groups Group (None for a block).
    group: Any = None
    #: Blocks: residual add node -> index of its skip operand; and the weights inside.
    skip_adds: dict[str, int] = field(default_factory=dict)
    block_weights: list[str] = field(default_factory=list)

    def overrides(self, key: str, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights with the units removed at ``key`` zeroed (made on demand: copies are big)."""
        if self.group is None:
            return {w: torch.zeros_like(weights[w]) for w in self.block_weights}
        return _zeroed(weights, self.group.units, self.settings[key])


def group_candidates(ir: IR, ctx: PassContext, keep_ratios: Sequence[float],
                     kinds: Sequence[str] = DEFAULT_KINDS) -> list[GroupCandidate]:
    """Groups from ``prune-groups`` (via the analysis manager when there is one), each with
    the weight overrides that remove its lowest-magnitude units at every keep ratio.

    Computed once per IR version and arguments and shared through ``ctx.memo``: every
    criterion scores the same groups (``slimc analyze`` runs five), and on all-MiniLM-L6-v2
    the per-unit norms alone were ~58,000 small tensor ops per call."""
    per_ir = ctx.memo.setdefault("sensitivity-groups", weakref.WeakKeyDictionary())
    version, found = per_ir.get(ir, (None, {}))
    if version != ir.version:
        found = {}
        per_ir[ir] = (ir.version, found)
    key = (tuple(keep_ratios), tuple(kinds))
    if key not in found:
        from slimc.jobs import single_threaded

        # small ops, one group after another: MiniLM 0.8 CPU-s on 2 threads, 0.1 on one
        with single_threaded():
            found[key] = _group_candidates(ir, ctx, keep_ratios, kinds)
    return found[key]


def unit_norms(weights: Mapping[str, torch.Tensor], units) -> torch.Tensor:
    """Squared L2 norm of everything each unit owns (float64): per weight slot, the squared
    entries summed over every axis but the slot's once, then gathered per unit with one
    ``index_add_`` (the same sums as slicing each unit out, in another order)."""
    norms = torch.zeros(len(units), dtype=torch.float64)
    per_slot: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
    for i, unit in enumerate(units):
        for slot, idx in unit.slices.items():
            ids, owners = per_slot.setdefault(slot, ([], []))
            ids.extend(idx)
            owners.extend([i] * len(idx))
    for (w, axis), (ids, owners) in per_slot.items():
        value = weights[w].detach().double().pow(2)
        others = [d for d in range(value.dim()) if d != axis]
        per_index = value.sum(dim=others) if others else value
        norms.index_add_(0, torch.tensor(owners), per_index[torch.tensor(ids)])
    return norms


def _group_candidates(ir: IR, ctx: PassContext, keep_ratios: Sequence[float],
                      kinds: Sequence[str]) -> list[GroupCandidate]:
    if ctx.analyses is not None:
        found = ctx.analyses.get("prune-groups")
    else:
        from slimc.passes.prune.groups import PruneGroupsAnalysis

        found = PruneGroupsAnalysis().run(ir, ctx, PruneGroupsAnalysis.Options())
    weights = ir.weights()
    shapes = {name: tuple(w.shape) for name, w in weights.items()}
    out: list[GroupCandidate] = []
    names: set[str] = set()
    for group in found.groups:
        if group.kind not in kinds:
            continue
        name = _unique(f"{group.module_path or '<root>'}:{group.kind}", names)
        norms = unit_norms(weights, group.units)
        order = norms.argsort().tolist()  # lowest magnitude first
        settings = {}
        for keep in keep_ratios:
            kept = max(1, round(keep * len(group.units)))
            removed = sorted(order[:len(group.units) - kept])
            settings[f"keep{keep:g}"] = removed
        out.append(GroupCandidate(name, group.kind, group.module_path, len(group.units),
                                  group.units[0].width,
                                  group.params_per_unit(shapes) * len(group.units), settings,
                                  group))
    for block in found.blocks:
        name = _unique(f"{block.module_path}:block", names)
        out.append(GroupCandidate(name, "block", block.module_path, 1, 1, block.params,
                                  {"keep0": [0]}, None, dict(block.adds),
                                  _block_weights(ir, block.module_path)))
    return out


def _unique(name: str, taken: set[str]) -> str:
    base, i = name, 1
    while name in taken:
        i += 1
        name = f"{base}#{i}"
    taken.add(name)
    return name


def _zeroed(weights: Mapping[str, torch.Tensor], units, removed: list[int]
            ) -> dict[str, torch.Tensor]:
    per_slot: dict[tuple[str, int], list[int]] = {}
    for u in removed:
        for slot, idx in units[u].slices.items():
            per_slot.setdefault(slot, []).extend(idx)
    out: dict[str, torch.Tensor] = {}
    for (w, axis), idx in per_slot.items():
        value = out.get(w, weights[w].detach())
        out[w] = value.index_fill(axis, torch.tensor(sorted(set(idx))), 0)
    return out


def _block_weights(ir: IR, path: str) -> list[str]:
    from slimc.passes.analysis.layers import weight_layers

    return [layer.weight.name for layer in weight_layers(ir)
            if layer.name == path or layer.name.startswith(path + ".")]


class _SkipAdds(Interpreter):
    """Runs the graph with the given residual adds returning their skip operand."""

    def __init__(self, module, skips: Mapping[str, int]) -> None:
        super().__init__(module)
        self._skips = dict(skips)

    def run_node(self, n):
        if n.name in self._skips:
            args = self.fetch_args_kwargs_from_env(n)[0]
            return args[self._skips[n.name]]
        return super().run_node(n)


def run_without_block(ir: IR, inputs: Sequence[torch.Tensor], skips: Mapping[str, int]):
    """User outputs with a block removed (each of its residual adds -> its skip input)."""
    from slimc.passes.analysis.criteria.execution import graph_values, user_outputs

    with torch.no_grad():
        return user_outputs(ir, _SkipAdds(ir.graph_module, skips).run(*graph_values(ir, inputs)))


def score_groups(candidates: list[GroupCandidate], weights: Mapping[str, torch.Tensor],
                 damage: Callable[[GroupCandidate, str, dict[str, torch.Tensor]], float],
                 map_jobs: Callable[[Callable, list], list[float]] | None = None, *,
                 select: Callable[[dict[str, list[str]]], set[tuple[str, str]] | None]
                 | None = None,
                 fill: Callable[[dict, dict[str, list[str]]], dict[str, dict[str, float]]]
                 | None = None) -> dict[str, GroupSensitivity]:
    """``damage(candidate, setting key, weight overrides)`` for every candidate and setting;
    ``map_jobs(fn, jobs)`` runs the (candidate, key) jobs (default: one after another).
    ``select(items)`` may name the (group, key) pairs to score (None: all) and ``fill`` then
    completes the curves from those (the selective perturbation criterion)."""
    items = {cand.name: list(cand.settings) for cand in candidates}
    wanted = select(items) if select is not None else None
    jobs = [(cand, key) for cand in candidates for key in cand.settings
            if wanted is None or (cand.name, key) in wanted]
    scored = (map_jobs or (lambda fn, jobs: [fn(job) for job in jobs]))(
        lambda job: damage(job[0], job[1], job[0].overrides(job[1], weights)), jobs)
    curves: dict[str, dict[str, float]] = {}
    for (cand, key), value in zip(jobs, scored, strict=True):
        curves.setdefault(cand.name, {})[key] = value
    if wanted is not None and fill is not None:
        curves = fill(curves, items)
    return {cand.name: GroupSensitivity(cand.name, cand.kind, cand.module_path, cand.units,
                                        cand.unit_width, cand.params, curves[cand.name],
                                        dict(cand.settings)) for cand in candidates}


def groups_json(groups: Mapping[str, GroupSensitivity]) -> dict[str, Any]:
    from dataclasses import asdict

    return {name: asdict(g) for name, g in groups.items()}
