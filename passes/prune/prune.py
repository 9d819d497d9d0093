"""``prune``: structured pruning that really removes channels, heads, residual width or blocks.

Pipeline: ``prune-groups`` (coupled units) -> importance per unit -> choose what to remove
(per group or globally, kept channel counts rounded to the target's vector width) -> optional
closed-form reconstruction of the consumer layers -> slice weights, rewrite shape constants and
re-infer shapes (:mod:`shapes`). The result is an ordinary, smaller IR: it runs, re-exports and
lowers through TVM like the original.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from pydantic import Field
from slimc.passes.prune import importance, reconstruct, shapes
from slimc.passes.prune.groups import Group, PruneGroups

from slimc import coverage
from slimc.ir import IR
from slimc.passmanager import PassContext, PassOptions, PreservedAnalyses, TransformPass

KINDS = {
    "channel": {"mlp-channel", "conv-filter"},
    "head": {"attention-head", "kv-group"},
    "width": {"residual"},
    "auto": {"mlp-channel", "conv-filter", "attention-head", "kv-group"},
    "all": {"mlp-channel", "conv-filter", "attention-head", "kv-group", "residual"},
    "block": set(),
}
#: Kinds whose unit is a single channel, so round_to applies to the kept unit count.
CHANNEL_KINDS = {"mlp-channel", "conv-filter", "residual"}


def kinds_for(granularity: str, gqa: str) -> set[str]:
    """Group kinds pruned at ``granularity``; under grouped-query attention ``gqa=query``
    swaps whole KV groups for query heads within them."""
    kinds = set(KINDS[granularity])
    if gqa == "query" and "kv-group" in kinds:
        kinds = (kinds - {"kv-group"}) | {"query-head"}
    return kinds


def default_round_to(info) -> int:
    """Channels per vector register at fp32 (``target-info``): 16 for AVX-512, 8 for AVX2 or
    a GPU's tensor-core rows, 4 for NEON; 8 without a target."""
    return info.fp32_lanes if info is not None else 8


class Prune(TransformPass):
    """Remove the least important channels, attention heads (GQA-aware), residual width or
    whole blocks; shape constants are rewritten so the smaller graph runs and compiles.

    Grouped-query attention (``n_rep`` query heads per K/V head): ``gqa=group`` removes whole
    KV groups (a K/V head with all its query heads); ``gqa=query`` removes query heads within
    the groups, the same number from every KV group of a layer (the lowest-scoring ones of
    each group), so K/V projections stay and ``repeat_kv``'s ``n_rep`` shrinks. Models without
    GQA (``n_rep == 1``) prune whole heads either way."""

    name = "prune"

    class Options(PassOptions):
        ratio: float = Field(0.3, gt=0, lt=1, description="Fraction of prunable units (blocks "
                             "for granularity=block) to remove; with budget=params, fraction "
                             "of the model's parameters.")
        granularity: Literal["channel", "head", "width", "block", "auto", "all"] = Field(
            "auto", description="channel: MLP neurons/conv filters; head: attention heads "
            "(under GQA see gqa); width: residual stream; block: whole residual blocks; auto: "
            "channel+head; all: channel+head+width.")
        gqa: Literal["group", "query"] = Field(
            "group", description="Heads under grouped-query attention: group removes whole KV "
            "groups (K/V head + its query heads); query removes query heads within KV groups, "
            "the same number from each group of a layer (K/V kept, n_rep shrinks; at least one "
            "query head per group stays). No effect without GQA.")
        budget: Literal["units", "params"] = Field(
            "units", description="units: ratio applies to unit counts; params: remove this "
            "fraction of all parameters (the unit ratio is found by bisection, counted exactly).")
        outputs: Literal["keep", "prune"] = Field(
            "keep", description="keep: channels reaching a graph output are never removed; "
            "prune: they may be (an embedding model's vector gets narrower).")
        criterion: Literal["activation", "magnitude"] = Field(
            "activation", description="Unit importance: |W|·‖X‖ on the example inputs, or |W|.")
        scope: Literal["uniform", "global"] = Field(
            "uniform", description="uniform: the same ratio in every group; global: rank units "
            "across groups by normalised score.")
        round_to: int | None = Field(None, ge=1, description="Kept channel counts are a "
                                     "multiple of this (default: the target's fp32 vector width).")
        reconstruct: Literal["none", "bias", "lsq"] = Field(
            "none", description="After removal refit consumer layers on the example inputs: "
                                "bias compensation or least squares (FLAP).")

    def run(self, ir: IR, ctx: PassContext, options: PassOptions) -> PreservedAnalyses:
        result: PruneGroups = ctx.analyses.get("prune-groups",
                                                pin_outputs=options.outputs == "keep")
        batches = ctx.calibration()
        if options.granularity == "block":
            removed = remove_blocks(ir, result, options.ratio, batches)
            ir.annotations[self.name] = {"granularity": "block", "removed_blocks": removed}
            return PreservedAnalyses.none() if removed else PreservedAnalyses.all()
        groups = result.prunable(kinds_for(options.granularity, options.gqa))
        inventory, reasons = coverage.inventory(ir), coverage.default_reasons(ir)
        if not groups:
            cov = prune_coverage(inventory, reasons, [], {}, {}, options.granularity)
            ir.annotations[self.name] = {"granularity": options.granularity, "removed_units": 0,
                                         "coverage": cov}
            ctx.log("prune: 0 units removed; " + coverage.describe(cov, "pruned"))
            return PreservedAnalyses.all()
        round_to = options.round_to or default_round_to(
            ctx.analyses.get("target-info") if ctx.target is not None
            and ctx.analyses is not None else None)
        scores = importance.score_groups(ir, result, groups, options.criterion, batches)
        if options.budget == "params":
            plan, unit_ratio = plan_for_params(ir, result, groups, scores, options.ratio,
                                               options.scope, round_to)
        else:
            plan, unit_ratio = choose(groups, scores, options.ratio, options.scope,
                                      round_to), options.ratio
        applied, stats, skipped = apply_or_skip(ir, result, groups, plan, batches,
                                                options.reconstruct)
        for g in groups:
            if g.index not in applied:
                plan[g.index] = []
        removed_roots = plan_roots(groups, plan)
        cov = prune_coverage(inventory, reasons, groups, plan, skipped, options.granularity)
        ctx.log(f"prune: {len(removed_roots)} units removed; "
                + coverage.describe(cov, "pruned"))
        ir.annotations[self.name] = {
            "granularity": options.granularity, "gqa": options.gqa,
            "criterion": options.criterion,
            "round_to": round_to, "reconstruct": options.reconstruct,
            "scope": options.scope, "budget": options.budget, "unit_ratio": unit_ratio,
            "removed_units": len(removed_roots), **stats,
            "groups": [{"index": g.index, "module_path": g.module_path, "kind": g.kind,
                        "units": len(g.units), "kept": len(g.units) - len(plan[g.index]),
                        **({"skipped": skipped[g.index]} if g.index in skipped else {})}
                       for g in groups],
            "coverage": cov}
        return PreservedAnalyses.none() if removed_roots else PreservedAnalyses.all()


def prune_coverage(inventory: dict, reasons: dict[str, str], groups: list[Group],
                   plan: dict[int, list[int]], skipped: dict[int, str],
                   granularity: str) -> dict:
    """:func:`slimc.coverage.coverage` for pruning: a weight is reached when a group it belongs
    to lost units; the others say why (the group's skip reason, a group that kept every unit,
    or no group of this granularity at all)."""
    reached: set[str] = set()
    why: dict[str, str] = {}
    for g in groups:
        weights = {w for unit in g.units for (w, _axis) in unit.slices}
        if plan.get(g.index):
            reached |= weights
            continue
        reason = skipped.get(g.index) or "its group kept every unit (ratio, rounding or scores)"
        for w in weights:
            why.setdefault(w, reason)
    merged = dict(reasons)
    for name in inventory:
        if name in why:
            merged[name] = why[name]
        elif name not in reasons and name not in reached:
            merged[name] = (f"in no prunable group (granularity={granularity}; pinned to a "
                            "graph output, or a structure the pass cannot resize)")
    return coverage.coverage(inventory, reached, merged)


def apply_or_skip(ir: IR, result: PruneGroups, groups: list[Group],
                  plan: dict[int, list[int]], batches, method: str
                  ) -> tuple[set[int], dict[str, int], dict[int, str]]:
    """Reconstruct and remove ``plan``; a group whose removal the shape rewriter cannot express
    (e.g. a norm over heads, a fused QKV that interleaves heads) is left whole, with the
    reason, and the rest is still pruned. Each attempt runs on a clone, so a failed one leaves
    ``ir`` untouched. Returns the groups applied, the removal stats and the skipped reasons."""
    def attempt(chosen: list[Group]) -> tuple[IR, dict[str, int]]:
        work = ir.clone()
        roots = plan_roots(chosen, plan)
        created = {}
        if method != "none":
            created = reconstruct.refit(work, result, roots, batches, method)
        return work, apply(work, result, roots, created)

    def adopt(work: IR) -> None:
        ir.program = work.program

    active = [g for g in groups if plan[g.index]]
    try:
        work, stats = attempt(active)
        adopt(work)
        return {g.index for g in active}, stats, {}
    except Exception:  # noqa: BLE001 - find the groups responsible below
        pass
    skipped: dict[int, str] = {}
    fine = []
    for g in active:
        try:
            attempt([g])
            fine.append(g)
        except Exception as exc:  # noqa: BLE001 - an inexpressible removal: skip the group
            skipped[g.index] = f"cannot remove these units: {type(exc).__name__}: {exc}"[:300]
    chosen: list[Group] = []
    best: tuple[IR, dict[str, int]] | None = None
    try:
        best = attempt(fine)
        chosen = fine
    except Exception:  # noqa: BLE001 - groups that only fail together: add one at a time
        for g in fine:
            try:
                best = attempt([*chosen, g])
                chosen.append(g)
            except Exception as exc:  # noqa: BLE001
                skipped[g.index] = f"cannot remove together with the others: " \
                                   f"{type(exc).__name__}: {exc}"[:300]
    if best is None:
        return set(), {"params_removed": 0, "constants_rewritten": 0}, skipped
    adopt(best[0])
    return {g.index for g in chosen}, best[1], skipped


def plan_roots(groups: list[Group], plan: dict[int, list[int]]) -> set[int]:
    """Union-find roots of every unit in ``plan`` (a KV group brings its query heads)."""
    return {r for g in groups for i in plan[g.index] for r in g.units[i].roots}


def _keep_count(group: Group, n_remove: int, round_to: int) -> int:
    n = len(group.units)
    if group.kind == "query-head":  # the same number from every KV group, one head kept
        parts = [len(p) for p in group.kv_groups]
        per = min(max(0, int(round(n_remove / len(parts)))), min(parts) - 1)
        return n - per * len(parts)
    keep = n - n_remove
    if group.kind in CHANNEL_KINDS and n >= 2 * round_to:
        keep = max(round_to, int(round(keep / round_to)) * round_to)
    return min(n, max(1, keep))


def _lowest(group: Group, scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``len(units) - keep`` lowest-scoring units (query heads: evenly from
    each KV group)."""
    if group.kind == "query-head":
        parts = group.kv_groups
        per = (len(group.units) - keep) // len(parts)
        return sorted(i for p in parts
                      for i in sorted(p, key=lambda i: float(scores[i]))[:per])
    return torch.argsort(scores).tolist()[:len(group.units) - keep]


def choose(groups: list[Group], scores: dict[int, torch.Tensor], ratio: float, scope: str,
           round_to: int) -> dict[int, list[int]]:
    """Per group, the indices of the units to remove (lowest scores first)."""
    if scope == "global":
        pooled = []
        for g in groups:
            s = scores[g.index]
            norm = s / s.mean().clamp(min=1e-12)
            pooled += [(float(v), g.index) for v in norm]
        pooled.sort()
        cut = int(len(pooled) * ratio)
        counts = {g.index: 0 for g in groups}
        for _, gi in pooled[:cut]:
            counts[gi] += 1
    else:
        counts = {g.index: int(round(ratio * len(g.units))) for g in groups}
    return {g.index: _lowest(g, scores[g.index], _keep_count(g, counts[g.index], round_to))
            for g in groups}


def params_after(ir: IR, result: PruneGroups, removed_roots: set[int]) -> int:
    """Exact parameter count (as :meth:`IR.num_params`) once ``removed_roots`` are removed,
    without touching ``ir``: every member weight keeps the product of its kept extents."""
    prop = result.propagation
    removed = shapes.removed_mask(prop, result.roots, removed_roots)
    shape_of = {n.name: list(ir.get_weight(n).shape) for n in ir.nodes("placeholder")
                if n.name in {w for w, _ in prop.members}}
    new = {w: list(s) for w, s in shape_of.items()}
    for (weight, axis), ids in prop.members.items():
        drop = (ids >= 0) & removed[ids.clamp(min=0)]
        new[weight][axis] -= int(drop.sum())
    nodes = {n.name: n for n in ir.nodes("placeholder")}
    delta, seen = 0, set()
    for weight, shape in new.items():
        t = ir.get_weight(nodes[weight])
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen or not t.is_floating_point():
            continue
        seen.add(key)
        delta += t.numel() - math.prod(shape)
    return ir.num_params() - delta


def plan_for_params(ir: IR, result: PruneGroups, groups: list[Group],
                    scores: dict[int, torch.Tensor], fraction: float, scope: str,
                    round_to: int) -> tuple[dict[int, list[int]], float]:
    """The plan whose parameter count is closest to ``(1 - fraction)`` of the model's, by
    bisection on the unit ratio (removed parameters grow monotonically with it up to rounding)."""
    total = ir.num_params()
    goal = total * (1 - fraction)

    def count(r: float):
        plan = choose(groups, scores, r, scope, round_to)
        return plan, params_after(ir, result, plan_roots(groups, plan))

    lo, hi = 0.0, 1.0
    best = None
    for _ in range(30):
        mid = (lo + hi) / 2
        plan, after = count(mid)
        if best is None or abs(after - goal) < abs(best[1] - goal):
            best = (plan, after, mid)
        if after > goal:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-4:
            break
    return best[0], best[2]


def apply(ir: IR, result: PruneGroups, removed_roots: set[int],
          extra_members: dict[tuple[str, int], torch.Tensor] | None = None) -> dict[str, int]:
    """Remove the units with ``removed_roots`` from ``ir`` (weights, constants, metadata).
    ``extra_members``: channel membership of weights added after the analysis ran (biases
    that :func:`reconstruct.refit` created), sliced with the rest."""
    prop = result.propagation
    if extra_members:
        prop = dataclasses.replace(prop, members={**prop.members, **extra_members})
    removed = shapes.removed_mask(prop, result.roots, removed_roots)
    predicted = shapes.new_shapes(prop, removed)
    scalars = shapes.slice_weights(ir, prop, removed)
    rewritten = shapes.rewrite_constants(ir, prop, removed, predicted)
    ir.refresh_meta()
    shapes.check_shapes(ir, predicted)
    ir.remove_unused_weights()
    ir.changed()
    return {"params_removed": scalars, "constants_rewritten": rewritten}


def remove_blocks(ir: IR, result: PruneGroups, ratio: float,
                  batches: list[list[torch.Tensor]]) -> list[str]:
    """Drop the blocks whose output is most similar to their input (ShortGPT's block
    influence, 1 - cos(in, out)), ``ratio`` of them, keeping at least one."""
    blocks = result.blocks
    if not blocks:
        return []
    nodes = {n.name: n for n in ir.nodes()}
    keep_names = set()
    for b in blocks:
        first, skip = b.adds[0]
        keep_names |= {nodes[first].args[skip].name, b.adds[-1][0]}
    _, kept = importance.record(ir, batches, keep=keep_names)
    influence = []
    for b in blocks:
        first, skip = b.adds[0]
        x = torch.cat([t.flatten(0, -2) for t in kept[nodes[first].args[skip].name]])
        y = torch.cat([t.flatten(0, -2) for t in kept[b.adds[-1][0]]])
        cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).mean()
        influence.append(1 - float(cos))
    n = min(len(blocks) - 1, max(1, int(math.floor(ratio * len(blocks) + 0.5))))
    chosen = sorted(range(len(blocks)), key=lambda i: influence[i])[:n]
    for i in chosen:
        for add_name, skip in blocks[i].adds:
            add = nodes[add_name]
            add.replace_all_uses_with(add.args[skip])
    _drop_dead(ir)
    ir.remove_unused_weights()
    ir.changed()
    return [blocks[i].module_path for i in chosen]


def _drop_dead(ir: IR) -> None:
    """Dead-code elimination that also drops metadata asserts and unused random ops (dropout)
    on dead values: torch's DCE keeps them as side effects, which would keep a removed block's
    weights alive."""
    ir.drop_dead_ops()
