"""Weight-bearing layers of an IR: the unit that cost and sensitivity are reported per.

A *layer* is one weight tensor of a linear, convolution or embedding op together with every op
node that reads it. Keying by the weight rather than by the op keeps tied weights (an LM head
sharing the token embedding) as one layer: compressing that tensor changes both uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node

from slimc.ir import IR

#: ATen op name (``str(node.target)`` without the overload) -> index of its weight argument.
WEIGHT_OPS: dict[str, int] = {
    "aten.linear": 1,
    "aten.conv1d": 1,
    "aten.conv2d": 1,
    "aten.conv3d": 1,
    "aten.convolution": 1,
    "aten.conv_transpose1d": 1,
    "aten.conv_transpose2d": 1,
    "aten.embedding": 0,
}


def op_name(node: Node) -> str:
    """``aten.linear.default`` -> ``aten.linear`` (``slimc.linear_int8.default`` alike); Python
    callables by their ``__name__``."""
    target = node.target
    if isinstance(target, str):
        return target
    text = str(target)
    if text.startswith(("aten.", "slimc.")):  # slimc's quantized ops: ``slimc.linear_int8``
        return text.rsplit(".", 1)[0] if text.count(".") >= 2 else text
    return getattr(target, "__name__", text)


@dataclass(frozen=True)
class Layer:
    """One weight tensor and the ops that use it."""

    #: Module path of the first op using the weight (``model.layers.0.mlp.up_proj``).
    name: str
    module_type: str
    #: ``linear``, ``conv`` or ``embedding`` (the first use).
    kind: str
    weight: Node
    ops: tuple[Node, ...]

    @property
    def output_channel_axis(self) -> int:
        """Axis of the weight whose slices are output channels (embedding: the hidden dim)."""
        return 1 if self.kind == "embedding" else 0


def _kind(op: str) -> str:
    if op == "aten.embedding":
        return "embedding"
    return "conv" if "conv" in op else "linear"


def weight_layers(ir: IR) -> list[Layer]:
    """Every floating-point weight read by a linear/conv/embedding op, in graph order."""
    weights = {n.name for n in ir.nodes("placeholder") if ir.placeholder_spec(n) is not None
               and ir.placeholder_spec(n).kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR")}
    by_weight: dict[str, list[Node]] = {}
    order: list[Node] = []
    for node in ir.nodes("call_function"):
        index = WEIGHT_OPS.get(op_name(node))
        if index is None or len(node.args) <= index:
            continue
        weight = node.args[index]
        if not isinstance(weight, Node) or weight.name not in weights:
            continue
        if weight.name not in by_weight:
            by_weight[weight.name] = []
            order.append(weight)
        by_weight[weight.name].append(node)
    layers = []
    used_names: set[str] = set()
    for weight in order:
        ops = by_weight[weight.name]
        if not ir.get_weight(weight).is_floating_point():
            continue
        info = ir.node_info(ops[0])
        name = info.module_path or weight.name
        if name in used_names:  # two weights under one module (rare): keep names unique
            name = f"{name}:{weight.name}"
        used_names.add(name)
        layers.append(Layer(name=name, module_type=info.module_type.rsplit(".", 1)[-1],
                            kind=_kind(op_name(ops[0])), weight=weight, ops=tuple(ops)))
    return layers
