"""Which layers quantize can rewrite, and how to rewrite them to slimc's ops.

Layers come from the IR's one recognizer (:mod:`slimc.layers`): a weight and every op reading
it, with its canonical ``[N, K]`` orientation whether the model calls ``linear(x, W)``,
``x @ W`` (GPT-2's ``Conv1D``) or ``x @ W.T`` (Falcon). A weight shared by several consumers
(an output head tied to the embedding) is one layer, so it is quantized once and both ops read
the same packed table. A weight with any other consumer is left alone: quantizing it would
keep the fp32 copy as well and grow the artifact.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from slimc.dialect import OPS
from slimc.ir import IR
from slimc.layers import Layer
from slimc.layers import find_layers as _find

aten = torch.ops.aten


def find_layers(ir: IR, embeddings: bool = True) -> list[Layer]:
    """Layers quantize can rewrite: every use a recognized weight op in one orientation."""
    return [layer for layer in _find(ir, complete_only=True, embeddings=embeddings)
            if layer.roles <= _QUANTIZABLE_ROLES]


#: Roles ``rewrite`` knows how to replace.
_QUANTIZABLE_ROLES = {"linear", "right", "embedding"}


def rewrite(ir: IR, layer: Layer, kind: str, tensors: dict[str, torch.Tensor],
            group_size: int = 0, act_scale: torch.Tensor | None = None,
            zero_point: int = 0) -> None:
    """Replace every consumer of ``layer`` by slimc's ``kind`` op reading ``tensors``.

    ``tensors`` holds the packed weight (``weight``) and, for int formats, ``scale`` (and
    ``zero`` for int4), all oriented ``[N, ...]``; ``w8a8`` has ``in_mult [K]`` and
    ``out_scale [N]`` instead of ``scale``.
    """
    base = layer.weight_node.name.removeprefix("p_")
    nodes = {key: ir.add_weight(f"{base}_{kind}_{key}", value) for key, value in tensors.items()}
    act_node = ir.add_weight(f"{base}_act_scale", act_scale) if act_scale is not None else None
    for use in layer.uses:
        node, role = use.node, use.role
        if role == "embedding":
            ids = node.args[1]
            if kind == "int8":
                args = (nodes["weight"], nodes["scale"], ids)
            else:
                args = (nodes["weight"], nodes["scale"], nodes["zero"], ids, group_size)
            _replace(ir, node, OPS[f"embedding_{kind}"], args)
            continue
        if role == "linear":
            x = node.args[0]
            bias = node.args[2] if len(node.args) > 2 else None
        elif role != "right":
            raise ValueError(f"quantize cannot rewrite a {role} use")
        elif node.target is aten.addmm.default:
            bias, x = node.args[0], node.args[1]
            if len(node.args) > 3 or node.kwargs:
                raise ValueError("addmm with beta/alpha is not supported")
        else:
            bias, x = None, node.args[0]
            if node.kwargs:
                raise ValueError(f"{node.target} with keyword arguments is not supported")
        if kind == "w8a8":
            args = (x, nodes["weight"], nodes["in_mult"], nodes["out_scale"], bias,
                    zero_point)
        elif kind == "int8":
            args = (x, nodes["weight"], nodes["scale"], bias, act_node)
        elif kind == "int4":
            args = (x, nodes["weight"], nodes["scale"], nodes["zero"], bias, act_node,
                    group_size)
        else:
            args = (x, nodes["weight"], bias)
        _replace(ir, node, OPS[f"linear_{kind}"], args)
    _erase_dead_views(ir, layer)


def _erase_dead_views(ir: IR, layer: Layer) -> None:
    """Drop the transposes / gathers that led from the old weight to the replaced ops."""
    for use in layer.uses:
        for node in reversed(use.via):
            if node.graph is ir.graph and not node.users:
                ir.graph.erase_node(node)


def _replace(ir: IR, node: Node, op, args: tuple) -> None:
    with ir.graph.inserting_before(node):
        new = ir.graph.call_function(op, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    # The export signature names graph outputs; keep it pointing at the replacement.
    for spec in ir.program.graph_signature.output_specs:
        if getattr(spec.arg, "name", None) == node.name:
            spec.arg.name = new.name
    ir.graph.erase_node(node)
