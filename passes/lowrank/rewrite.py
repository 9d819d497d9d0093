"""IR surgery for factorized layers: one weight op becomes two real ops on two smaller weights.

``linear(x, W, b)`` → ``linear(linear(x, V), U, b)``; GPT-2's ``addmm(b, x, Wᵀ)`` / ``mm`` /
``matmul`` the same; ``embedding(W, ids)`` → ``linear(embedding(U, ids), Vᵀ)``, and an output
head tied to that embedding reads the same ``U`` and ``V`` (``linear(linear(x, V), U)``), so the
tie survives. The new ops are ordinary ATen ops: TVM lowers them as two GEMMs, so the compiled
library stores ``r·(N+K)`` numbers instead of ``N·K`` and does that much less work; later passes
(quantize, prune, share) see two ordinary linear layers.
"""

from __future__ import annotations

import re

import torch
from torch.fx import Node

from slimc.ir import IR
from slimc.layers import Layer, find_layers

aten = torch.ops.aten


#: Uses :func:`factorize_layer` can rewrite.
FACTORIZABLE_ROLES = {"linear", "right", "embedding"}


def weight_layers(ir: IR, embeddings: bool = True) -> list[Layer]:
    """Layers this module can factorize: every use of the weight a linear, a matmul against
    it (any orientation) or an embedding gather (:mod:`slimc.layers`)."""
    return [layer for layer in find_layers(ir, complete_only=True, embeddings=embeddings)
            if layer.roles <= FACTORIZABLE_ROLES]


#: Placeholder names of factors this module and ``share`` create (``..._lr_u``, ``..._bs_v``,
#: ``..._shared_basis``, block tying's ``..._tied`` and ``..._td_u``):
#: factorizing a factor again only adds an op.
FACTOR_NAME = re.compile(r"_(lr|bs|td)_(u|v|vt)(_\d+)?$|_(shared_basis|tied)(_\d+)?$")


def is_factor(layer: Layer) -> bool:
    """True when ``layer``'s weight is already one factor of a low-rank pair."""
    return bool(FACTOR_NAME.search(layer.weight_node.name))


def _node_like(ir: IR, reference: Node, op, args: tuple) -> Node:
    with ir.graph.inserting_before(reference):
        node = ir.graph.call_function(op, args)
    node.meta = {k: v for k, v in reference.meta.items() if k != "val"}
    return node


def _replace(ir: IR, old: Node, new: Node) -> None:
    new.meta.setdefault("val", old.meta.get("val"))
    old.replace_all_uses_with(new)
    for spec in ir.program.graph_signature.output_specs:
        if getattr(spec.arg, "name", None) == old.name:
            spec.arg.name = new.name
    ir.graph.erase_node(old)


def operands(use) -> tuple[Node, Node | None]:
    """``(activation, bias)`` of a linear-like use (``linear``, ``addmm``, ``mm``, ``matmul``)."""
    node = use.node
    if use.role == "linear":
        return node.args[0], (node.args[2] if len(node.args) > 2 else None)
    if node.target is aten.addmm.default:
        if len(node.args) > 3 or node.kwargs:
            raise ValueError("addmm with beta/alpha")
        return node.args[1], node.args[0]
    return node.args[use.input_arg or 0], None


def replace_node(ir: IR, old: Node, new: Node) -> None:
    """Point every user (and graph output) of ``old`` at ``new`` and erase ``old``."""
    _replace(ir, old, new)


def node_like(ir: IR, reference: Node, op, args: tuple) -> Node:
    """A new ``op(*args)`` before ``reference``, carrying its metadata (not its value)."""
    return _node_like(ir, reference, op, args)


def factorize_layer(ir: IR, layer: Layer, u: torch.Tensor, v: torch.Tensor | None,
                    tag: str = "lr", v_node: Node | None = None) -> None:
    """Rewrite every use of ``layer`` (``W[N, K] ≈ u[N, r] @ v[r, K]``) to two ops. A
    ``v_node`` already in the IR (a basis shared by several layers) is used instead of ``v``."""
    base = layer.weight_node.name.removeprefix("p_")
    roles = layer.roles
    if v_node is not None and "embedding" in roles:
        raise ValueError("a shared basis cannot factorize an embedding gather")
    u_node = ir.add_weight(f"{base}_{tag}_u", u)
    if v_node is None and roles != {"embedding"}:
        v_node = ir.add_weight(f"{base}_{tag}_v", v)
    vt_node = ir.add_weight(f"{base}_{tag}_vt", v.t().contiguous()) \
        if "embedding" in roles else None
    for use in layer.uses:
        node, role = use.node, use.role
        if role == "embedding":
            gathered = _node_like(ir, node, aten.embedding.default,
                                  (u_node, node.args[1], *node.args[2:]))
            out = _node_like(ir, node, aten.linear.default, (gathered, vt_node))
            _replace(ir, node, out)
            continue
        x, bias = operands(use)
        inner = _node_like(ir, node, aten.linear.default, (x, v_node))
        out = _node_like(ir, node, aten.linear.default,
                         (inner, u_node) if bias is None else (inner, u_node, bias))
        _replace(ir, node, out)
    for use in layer.uses:  # transposes that led from the old weight to the replaced ops
        for view in reversed(use.via):
            if view.graph is ir.graph and not view.users:
                ir.graph.erase_node(view)
