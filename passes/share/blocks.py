"""Block tying with per-layer low-rank deltas (``share{blocks=true}``).

Layers at the same position in adjacent blocks (``layers.0.mlp.up_proj``, ``layers.1.mlp.up_proj``
...) are stored as *one* shared tensor ``W̄`` plus, per layer, a low-rank correction fitted on
calibration data: ``W_l ≈ W̄ + U_l V_l``. ALBERT and MobileLLM tie blocks while training; a
pretrained model's blocks differ, so tying them needs the deltas (Relaxed Recursive
Transformers, Bae et al., 2024, who initialize the deltas by truncated SVD of ``W_l − W̄``).
Here both parts are fitted to what the layers compute on the calibration data rather than to the
weights:

* ``W̄ = (Σ_l W_l H_l)(Σ_l H_l)⁻¹`` with ``H_l = X_lᵀX_l`` — the single matrix whose outputs are
  closest to every layer's on its own inputs (the normal equations of ``Σ_l ‖(W_l − W̄)X_lᵀ‖²``);
* ``U_l V_l`` — the whitened (SVD-LLM) truncation of ``W_l − W̄`` in ``H_l``'s metric, so the
  delta's rank goes to the output error that remains.

The rewritten op is ``linear(x, W̄, b) + linear(linear(x, V_l), U_l)``; ``W̄`` is one placeholder
read by every layer of the group, so the compiled library holds it once.
"""

from __future__ import annotations

import torch
from slimc.passes.lowrank import factorize
from slimc.passes.lowrank.rewrite import node_like, operands, replace_node
from slimc.passes.quantize import calib

from slimc.ir import IR
from slimc.passmanager import PassContext

aten = torch.ops.aten


@factorize._serial
def shared_weight(mats: list[torch.Tensor], grams: list[torch.Tensor]) -> torch.Tensor:
    """``(Σ W_l H_l)(Σ H_l)⁻¹``, damped by 1e-4 of the mean diagonal toward the plain mean
    (directions no calibration input reached are the average of the layers)."""
    total = sum(g.double() for g in grams)
    damp = 1e-4 * float(total.diagonal().mean() or 1.0)
    eye = torch.eye(total.shape[0], dtype=torch.float64)
    rhs = sum(m.double() @ (g.double() + damp * eye) for m, g in zip(mats, grams, strict=True))
    lhs = total + len(mats) * damp * eye
    return torch.linalg.solve(lhs, rhs.T).T  # lhs is symmetric: X lhs = rhs  <=>  lhs Xᵀ = rhsᵀ


def plan_groups(ir: IR, ctx: PassContext, groups: list[list], skipped: dict[str, str]) -> list:
    """Per group: the shared matrix and each layer's delta spectrum."""
    members = [la for g in groups for la in g]
    stats = calib.collect(ir, members, ctx.calibration(), hessian=True)
    plans = []
    for g in groups:
        mats = [la.matrix(ir) for la in g]
        n, k = mats[0].shape
        grams = []
        for la in g:
            st = stats.get(la.name)
            grams.append(st.hessian if st is not None and st.hessian is not None
                         else torch.eye(k))
        try:
            shared = shared_weight(mats, grams)
            deltas = [factorize.whitened(m.double() - shared, h) for m, h in
                      zip(mats, grams, strict=True)]
        except (ValueError, torch.linalg.LinAlgError) as exc:
            for la in g:
                skipped[la.name] = f"block tying failed: {exc}"
            continue
        plans.append((g, shared.float(), deltas, n, k))
    return plans


def delta_ranks(plans: list, goal: float, round_to: int) -> list[int | None]:
    """One delta-rank rule for all groups (the same fraction of each layer's full rank), the
    largest meeting ``goal`` removed parameters; None for a group that would not save any."""
    def ranks_for(keep: float) -> tuple[list, int]:
        out, removed = [], 0
        for g, _, _, n, k in plans:
            r = factorize.rank_for_ratio(n, k, keep, round_to)
            saved = len(g) * n * k - (n * k + len(g) * r * (n + k))
            if saved <= 0:
                out.append(None)
                continue
            out.append(r)
            removed += saved
        return out, removed

    ranks, *_ = factorize.closest_plan(ranks_for, goal, 0.0, 1.0, removed_grows=False)
    return ranks


def tie_group(ir: IR, group: list, shared: torch.Tensor, deltas: list, rank: int) -> None:
    """Rewrite each layer of ``group`` to read the one shared tensor plus its delta factors."""
    base = group[0].weight_node.name.removeprefix("p_")
    shared_node = ir.add_weight(f"{base}_tied", shared)
    for layer, spec in zip(group, deltas, strict=True):
        lbase = layer.weight_node.name.removeprefix("p_")
        u_node = v_node = None
        if rank:
            u, v = spec.factors(rank)
            u_node = ir.add_weight(f"{lbase}_td_u", u)
            v_node = ir.add_weight(f"{lbase}_td_v", v)
        for use in layer.uses:
            x, bias = operands(use)
            args = (x, shared_node) if bias is None else (x, shared_node, bias)
            out = node_like(ir, use.node, aten.linear.default, args)
            if rank:
                inner = node_like(ir, use.node, aten.linear.default, (x, v_node))
                delta = node_like(ir, use.node, aten.linear.default, (inner, u_node))
                out = node_like(ir, use.node, aten.add.Tensor, (out, delta))
            replace_node(ir, use.node, out)
        for use in layer.uses:
            for view in reversed(use.via):
                if view.graph is ir.graph and not view.users:
                    ir.graph.erase_node(view)


def tie_blocks(ir: IR, ctx: PassContext, groups: list[list], ratio: float, round_to: int,
               skipped: dict[str, str]) -> list[dict]:
    """Tie each group to one tensor plus per-layer deltas, ranks meeting ``ratio`` of the
    model's parameters; returns a record per tied group."""
    plans = plan_groups(ir, ctx, groups, skipped)
    ranks = delta_ranks(plans, ratio * ir.num_params(), round_to)
    done = []
    for (g, shared, deltas, n, k), r in zip(plans, ranks, strict=True):
        if r is None:
            for la in g:
                skipped[la.name] = "block tying would not save parameters at this budget"
            continue
        losses = [round(d.loss(r), 6) for d in deltas]
        tie_group(ir, g, shared, deltas, r)
        done.append({"layers": [la.name for la in g], "delta_rank": r, "shape": [n, k],
                     "params": [len(g) * n * k, n * k + len(g) * r * (n + k)],
                     "delta_loss": losses})
    return done
