"""``share``: store a tensor once where several layers can use it.

``share{dedup=true, tie_head=true, tie_tolerance=1e-6, basis=false, blocks=false, ratio=0.2,
group=2}``

* **dedup** — weights with identical dtype, shape and bytes become one placeholder (all readers
  rewired to it), so the artifact stores one constant. Exact.
* **tie_head** — an output head ``linear(x, H)`` and a token embedding ``embedding(E, ids)`` of
  the same shape become one tensor when ``‖H − E‖ ≤ tie_tolerance·‖E‖`` (models saved with tied
  weights but captured as two copies); otherwise the measured difference is recorded and they
  stay apart (tying a pretrained untied model would change it).
* **blocks** — block tying (:mod:`.blocks`): the same groups store one shared tensor plus a
  per-layer low-rank delta fitted on calibration data, ``W_l ≈ W̄ + U_l V_l``.
* **basis** — Basis Sharing (Wang et al., ICLR 2025): adjacent layers of one kind (the same
  module path up to the layer index, the same shape) share one whitened SVD basis
  ``B[r, K]`` and keep their own coefficients ``C_l[N, r]``: ``W_l ≈ C_l · B``. With ``S`` the
  Cholesky factor of the group's summed ``XᵀX``, the SVD of ``[W_1 S; …; W_g S]`` truncated to
  r gives ``B = √Σ_r V_rᵀ S⁻¹`` and ``C_l`` the layer's rows of ``U_r √Σ_r``. Ranks meet
  ``ratio`` of the model's parameters, uniformly per group, rounded to the vector width.

Anything not shared is recorded with its reason in ``ir.annotations["share"]``.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict

import torch
from pydantic import Field, model_validator
from slimc.passes.lowrank import factorize
from slimc.passes.lowrank.lowrank import default_round_to
from slimc.passes.lowrank.rewrite import factorize_layer, is_factor, weight_layers
from slimc.passes.quantize import calib
from slimc.passes.share.blocks import tie_blocks
from torch.export.graph_signature import InputKind, OutputKind

from slimc import coverage
from slimc.ir import IR
from slimc.passmanager import PassContext, PassOptions, PreservedAnalyses, TransformPass


class ShareOptions(PassOptions):
    dedup: bool = Field(True, description="Store bit-identical weight tensors once.")
    tie_head: bool = Field(True, description="Tie an output head to the token embedding "
                           "when they are equal within tie_tolerance.")
    tie_tolerance: float = Field(1e-6, ge=0, le=1, description="Relative Frobenius "
                                 "difference under which head and embedding are tied.")
    basis: bool = Field(False, description="Share one whitened SVD basis across groups of "
                        "adjacent layers of the same kind (lossy; see ratio, group).")
    ratio: float = Field(0.2, gt=0, lt=1, description="`basis`/`blocks`: fraction of the "
                         "model's parameters to remove.")
    group: int = Field(2, ge=2, le=64, description="`basis`/`blocks`: adjacent layers per "
                       "shared basis / tied tensor.")
    blocks: bool = Field(False, description="Block tying: adjacent layers of one kind "
                         "store one shared tensor plus per-layer low-rank deltas fitted on "
                         "calibration data (lossy; see ratio, group).")
    round_to: int | None = Field(None, ge=1, le=256, description="`basis`/`blocks`: ranks "
                                 "are multiples of this (default: the target's vector width).")

    @model_validator(mode="after")
    def _one_lossy_mode(self) -> ShareOptions:
        if self.basis and self.blocks:
            raise ValueError("basis=true and blocks=true both share the same layers: choose "
                             "one (run share twice on different layers with skip patterns "
                             "is not supported)")
        return self


class Share(TransformPass):
    """Store shared tensors once: exact deduplication, embedding/head tying, and whitened
    basis sharing across adjacent layers."""

    name = "share"
    Options = ShareOptions

    def run(self, ir: IR, ctx: PassContext, options: PassOptions) -> PreservedAnalyses:
        assert isinstance(options, ShareOptions)
        summary = share_ir(ir, ctx, options)
        ir.annotations[self.name] = summary
        ctx.log(f"share: {summary['deduplicated']} duplicates, tied={summary['tied']}, "
                f"{len(summary['basis_groups'])} basis groups, "
                f"{len(summary['tied_blocks'])} tied block groups; params "
                f"{summary['params_before']:,} -> {summary['params_after']:,}; "
                + coverage.describe(summary["coverage"], "shared"))
        changed = summary["deduplicated"] or summary["tied"] or summary["basis_groups"] \
            or summary["tied_blocks"]
        return PreservedAnalyses.none() if changed else PreservedAnalyses.all()


def _mutated_buffers(ir: IR) -> set[str]:
    return {s.target for s in ir.program.graph_signature.output_specs
            if s.kind != OutputKind.USER_OUTPUT and getattr(s, "target", None)}


def deduplicate(ir: IR) -> list[list[str]]:
    """Rewire readers of bit-identical weights to one placeholder; returns the merged names."""
    mutated = _mutated_buffers(ir)
    first: dict[tuple, torch.fx.Node] = {}
    merged: dict[str, list[str]] = defaultdict(list)
    for node in list(ir.nodes("placeholder")):
        spec = ir.placeholder_spec(node)
        if spec is None or spec.kind == InputKind.USER_INPUT or spec.target in mutated \
                or not node.users:
            continue
        t = ir.get_weight(node).detach().contiguous()
        digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel()
                                else b"").hexdigest()
        key = (t.dtype, tuple(t.shape), digest)
        if key not in first:
            first[key] = node
            continue
        keep = first[key]
        node.replace_all_uses_with(keep)
        merged[keep.name].append(node.name)
    if merged:
        ir.remove_unused_weights()
    return [[k, *v] for k, v in merged.items()]


def tie_head(ir: IR, tolerance: float) -> tuple[bool, str]:
    """Point an untied output head at the token embedding when they are (nearly) equal."""
    layers = weight_layers(ir, embeddings=True)
    head_op = _last_linear(ir)
    embeds = [la for la in layers if la.roles == {"embedding"}]
    heads = [la for la in layers if la.roles == {"linear"} and la.uses[0].node is head_op]
    if any(la.is_embedding and la.linear_nodes for la in layers):
        return False, "head already tied to the embedding"
    if not embeds or not heads:
        return False, "no token embedding and output head pair"
    head = heads[0]
    h = ir.get_weight(head.weight_node)
    for emb in embeds:
        e = ir.get_weight(emb.weight_node)
        if e.shape != h.shape or e.dtype != h.dtype:
            continue
        diff = float((h.double() - e.double()).norm() / e.double().norm().clamp_min(1e-30))
        if diff <= tolerance:
            for use in head.uses:
                use.node.replace_input_with(head.weight_node, emb.weight_node)
            ir.remove_unused_weights()
            return True, f"tied {head.name} to {emb.name} (relative difference {diff:.2g})"
        return False, (f"{head.name} differs from {emb.name} by {diff:.3g} relative "
                       f"(> tie_tolerance {tolerance:g}): tying would change the model")
    return False, "no embedding of the head's shape"


def _last_linear(ir: IR):
    """The linear op producing a graph output (the LM head), if any."""
    out = next(iter(reversed(ir.graph.nodes)))
    for node in _flatten(out.args):
        while isinstance(node, torch.fx.Node) and node.op == "call_function" \
                and node.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default,
                                    torch.ops.aten.slice.Tensor):
            node = node.args[0]
        if isinstance(node, torch.fx.Node) and node.target is torch.ops.aten.linear.default:
            return node
    return None


def _flatten(args) -> list:
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out += _flatten(a)
        else:
            out.append(a)
    return out


def basis_groups(layers: list, group: int) -> list[list]:
    """Adjacent layers of one kind and shape, ``group`` at a time (a shorter tail group of at
    least two is kept)."""
    kinds: dict[tuple, list] = defaultdict(list)
    for la in layers:
        if la.is_embedding or is_factor(la) or len(re.findall(r"\.(\d+)\.", la.name)) != 1:
            continue
        kinds[(re.sub(r"\.\d+\.", ".#.", la.name), tuple(la.weight_node.meta["val"].shape),
               la.transposed)].append(la)
    groups = []
    for members in kinds.values():
        members.sort(key=lambda la: int(re.findall(r"\.(\d+)\.", la.name)[0]))
        for i in range(0, len(members), group):
            chunk = members[i:i + group]
            if len(chunk) >= 2:
                groups.append(chunk)
    return groups


def share_basis(ir: IR, ctx: PassContext, options: ShareOptions,
                skipped: dict[str, str]) -> list[dict]:
    layers = weight_layers(ir, embeddings=False)
    groups = basis_groups(layers, options.group)
    if not groups:
        skipped["basis"] = ("no two adjacent layers of one kind (module path up to the layer "
                            "index) and shape: nothing to share a basis")
        return []
    members = [la for g in groups for la in g]
    stats = calib.collect(ir, members, ctx.calibration(), hessian=True)
    round_to = options.round_to or default_round_to(ctx)
    plans = []
    for g in groups:
        mats = [la.matrix(ir) for la in g]
        n, k = mats[0].shape
        gram = None
        for la in g:
            st = stats.get(la.name)
            if st is None or st.hessian is None:
                continue
            gram = st.hessian if gram is None else gram + st.hessian
        if gram is None:
            gram = torch.eye(k)  # no activations reached these layers: plain SVD
        s_chol = factorize.cholesky_factor(gram)
        stacked = torch.cat([m.double() @ s_chol for m in mats])
        with factorize.serial_lapack():
            u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
        vh = torch.linalg.solve_triangular(s_chol.T, vh.T, upper=True).T
        plans.append((g, factorize.Spectrum(u, s, vh), n, k))
    goal = options.ratio * ir.num_params()

    def ranks_for(keep: float) -> tuple[list[int], int]:
        out, removed = [], 0
        for g, _, n, k in plans:
            dense, per_rank = len(g) * n * k, k + len(g) * n
            r = (int(keep * dense / per_rank) // round_to) * round_to
            if r <= 0 or r * per_rank >= dense:
                r = 0
            out.append(r)
            removed += dense - r * per_rank if r else 0
        return out, removed

    best_ranks, *_ = factorize.closest_plan(ranks_for, goal, 0.0, 1.0, removed_grows=False)
    done = []
    for (g, spec, n, k), r in zip(plans, best_ranks, strict=True):
        if not r:
            for la in g:
                skipped[la.name] = "basis sharing would not save parameters at this budget"
            continue
        coeffs, basis = spec.factors(r)
        base = g[0].weight_node.name.removeprefix("p_")
        basis_node = ir.add_weight(f"{base}_shared_basis", basis)
        for i, la in enumerate(g):
            factorize_layer(ir, la, coeffs[i * n:(i + 1) * n].contiguous(), None,
                            tag="bs", v_node=basis_node)
        done.append({"layers": [la.name for la in g], "rank": r, "shape": [int(n), int(k)],
                     "params": [len(g) * n * k, r * (k + len(g) * n)],
                     "predicted_loss": round(spec.loss(r), 6)})
    return done


def tie_layer_blocks(ir: IR, ctx: PassContext, options: ShareOptions,
                     skipped: dict[str, str]) -> list[dict]:
    """Block tying with low-rank deltas (:mod:`.blocks`) over the same groups basis sharing
    uses."""
    groups = basis_groups(weight_layers(ir, embeddings=False), options.group)
    if not groups:
        skipped["blocks"] = ("no two adjacent layers of one kind (module path up to the layer "
                             "index) and shape: nothing to tie")
        return []
    return tie_blocks(ir, ctx, groups, options.ratio, options.round_to or default_round_to(ctx),
                      skipped)


def share_ir(ir: IR, ctx: PassContext, options: ShareOptions) -> dict:
    """Share tensors in ``ir`` in place; returns a JSON summary."""
    params_before, bytes_before = ir.num_params(), ir.weight_bytes()
    inventory, reasons = coverage.inventory(ir), coverage.default_reasons(ir)
    layer_weights = {la.name: la.weight_node.name for la in weight_layers(ir, embeddings=True)}
    readers_before = {n.name: len(n.users) for n in ir.nodes("placeholder")}
    skipped: dict[str, str] = {}
    merged = deduplicate(ir) if options.dedup else []
    tied, tie_note = tie_head(ir, options.tie_tolerance) if options.tie_head \
        else (False, "tie_head=false")
    groups = share_basis(ir, ctx, options, skipped) if options.basis else []
    tied_blocks = tie_layer_blocks(ir, ctx, options, skipped) if options.blocks else []
    ir.remove_unused_weights()
    if groups or tied_blocks:
        ir.refresh_meta()
    ir.changed()
    reached = _shared_weights(ir, inventory, readers_before)
    reasons = _unshared_reasons(options, layer_weights, skipped) | reasons
    return {"deduplicated": sum(len(m) - 1 for m in merged), "merged": merged,
            "tied": tied, "tie": tie_note, "basis_groups": groups,
            "tied_blocks": tied_blocks, "skipped": skipped,
            "params_before": params_before, "params_after": ir.num_params(),
            "bytes_before": bytes_before, "bytes_after": ir.weight_bytes(),
            "coverage": coverage.coverage(inventory, reached, reasons)}


def _shared_weights(ir: IR, inventory: dict, readers_before: dict[str, int]) -> set[str]:
    """Weights the pass shared: those it removed (a duplicate, a tied head, a layer now reading
    a shared basis or tied block) and those that gained readers (the copy the others now use)."""
    after = {n.name: len(n.users) for n in ir.nodes("placeholder")}
    return {name for name in inventory if name not in after
            or after[name] > readers_before.get(name, 0)}


def _unshared_reasons(options: ShareOptions, layer_weights: dict[str, str],
                      skipped: dict[str, str]) -> dict[str, str]:
    """Why each weight layer kept its own tensor (placeholder name -> reason)."""
    lossy = options.basis or options.blocks
    reasons = {}
    for layer, weight in layer_weights.items():
        if layer in skipped:
            reasons[weight] = skipped[layer]
        elif lossy:
            reasons[weight] = ("no adjacent layer of the same kind and shape to share with "
                               "(or an embedding: not shared)")
        else:
            reasons[weight] = ("no identical tensor (basis=true or blocks=true shares similar "
                               "layers, lossily)")
    return reasons
