"""Which nodes of the IR carry quantizable weights, and how to rewrite them to slimc's ops.

A *layer* is one weight matrix ``W[N, K]`` (outputs x inputs) and the nodes that consume it:
``aten.linear`` (``W`` as stored), ``aten.addmm`` / ``aten.mm`` / ``aten.matmul`` with a weight
on the right (GPT-2's ``Conv1D`` stores ``W.T``), and ``aten.embedding`` (rows = vocabulary).
A weight shared by several consumers (an output head tied to the embedding) is one layer, so it
is quantized once and both ops read the same packed table. A weight with any other consumer is
left alone: quantizing it would keep the fp32 copy as well and grow the artifact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from slimc.backends.tvm.quantized_ops import OPS
from torch.export.graph_signature import InputKind
from torch.fx import Node

from slimc.ir import IR

aten = torch.ops.aten
_LINEAR = {aten.linear.default: 1}
_RIGHT = {aten.addmm.default: 2, aten.mm.default: 1, aten.matmul.default: 1}
_EMBEDDING = aten.embedding.default


@dataclass
class Layer:
    """One quantizable weight and its consumers."""

    name: str
    weight_node: Node
    #: (node, role) with role "linear" (W stored [N,K]), "right" (stored [K,N]), "embedding".
    uses: list[tuple[Node, str]] = field(default_factory=list)

    @property
    def transposed(self) -> bool:
        return any(role == "right" for _, role in self.uses)

    @property
    def is_embedding(self) -> bool:
        return any(role == "embedding" for _, role in self.uses)

    @property
    def linear_nodes(self) -> list[Node]:
        return [node for node, role in self.uses if role != "embedding"]

    def matrix(self, ir: IR) -> torch.Tensor:
        """The weight as ``[N, K]`` float32 (outputs x inputs; rows x width for embeddings)."""
        w = ir.get_weight(self.weight_node).detach().float()
        return w.t().contiguous() if self.transposed else w.clone()  # never alias the IR


def _role(node: Node, weight: Node) -> str | None:
    if node.target in _LINEAR and node.args[1] is weight and node.args[0] is not weight:
        return "linear"
    if node.target in _RIGHT and len(node.args) > _RIGHT[node.target] \
            and node.args[_RIGHT[node.target]] is weight \
            and sum(a is weight for a in node.args) == 1:
        return "right"
    if node.target is _EMBEDDING and node.args[0] is weight:
        return "embedding"
    return None


def find_layers(ir: IR, embeddings: bool = True) -> list[Layer]:
    """Every 2-D float parameter whose consumers are all quantizable ops, in graph order."""
    layers = []
    for node in ir.nodes("placeholder"):
        spec = ir.placeholder_spec(node)
        if spec is None or spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER,
                                             InputKind.CONSTANT_TENSOR):
            continue
        value = ir.get_weight(node)
        if value.dim() != 2 or not value.is_floating_point() or not node.users:
            continue
        uses = [(user, _role(user, node)) for user in node.users]
        if any(role is None for _, role in uses):
            continue
        roles = {role for _, role in uses}
        if "right" in roles and roles != {"right"}:
            continue  # the same tensor read as W and as W.T: leave it
        if "embedding" in roles and not embeddings:
            continue
        layers.append(Layer(spec.target, node, uses))  # type: ignore[arg-type]
    return layers


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
    for node, role in layer.uses:
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
        elif node.target is aten.addmm.default:
            bias, x = node.args[0], node.args[1]
            if len(node.args) > 3 or node.kwargs:
                raise ValueError("addmm with beta/alpha is not supported")
        else:
            bias, x = None, node.args[0]
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
