"""Fold inference-mode batch norm into the convolution before it (run by ``quantize`` first).

A convolution followed by ``batch_norm`` computes ``(conv(x, W) + b - mean) * g / sqrt(var +
eps) + beta``: one convolution with ``W * s`` (``s`` per output channel) and a new bias. Folding
first means the quantizer rounds the weight the model really applies (a channel that batch norm
scales up by 10x would otherwise have its rounding error scaled up too), and the batch norm's
four vectors leave the artifact. The same rewrite as the ``fold-batchnorm`` example plugin,
built in so ``quantize`` does not depend on a plugin being installed.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from slimc.ir import IR
from slimc.layers import CONV_OPS, op_name

aten = torch.ops.aten


def fold_batchnorm(ir: IR) -> int:
    """Fold every foldable ``conv -> batch_norm`` pair in place; returns how many."""
    folded = 0
    for bn in list(ir.nodes("call_function")):
        if bn.target is aten.batch_norm.default and _fold(ir, bn):
            folded += 1
    if folded:
        ir.remove_unused_weights()
        ir.changed()
    return folded


def _weight(ir: IR, node) -> torch.Tensor | None:
    if node is None:
        return None
    if not isinstance(node, Node) or node.op != "placeholder":
        raise KeyError(node)
    return ir.get_weight(node)


def _fold(ir: IR, bn: Node) -> bool:
    conv, gamma, beta, mean, var, training, _momentum, eps = bn.args[:8]
    if training or not isinstance(conv, Node) or conv.op != "call_function" \
            or op_name(conv) not in CONV_OPS or len(conv.users) != 1 \
            or mean is None or var is None:
        return False
    if op_name(conv) == "aten.convolution" and conv.args[6]:
        return False  # transposed: output channels are on axis 1 of the weight
    weight_node = conv.args[1]
    bias_node = conv.args[2] if len(conv.args) > 2 else None
    try:
        weight = _weight(ir, weight_node)
        bias = _weight(ir, bias_node)
        g, b, mu, sigma2 = (_weight(ir, n) for n in (gamma, beta, mean, var))
    except KeyError:  # computed at run time: leave it alone
        return False
    if weight is None or len(weight_node.users) != 1 \
            or (bias_node is not None and len(bias_node.users) != 1):
        return False
    g = torch.ones_like(mu) if g is None else g
    b = torch.zeros_like(mu) if b is None else b
    scale = g / torch.sqrt(sigma2 + eps)
    ir.set_weight(weight_node, weight * scale.reshape(-1, *([1] * (weight.dim() - 1))))
    new_bias = ((bias if bias is not None else torch.zeros_like(mu)) - mu) * scale + b
    if bias_node is not None:
        ir.set_weight(bias_node, new_bias)
    else:
        args = list(conv.args) + [None] * (3 - len(conv.args))
        args[2] = ir.add_weight(f"{weight_node.name}_folded_bias", new_bias)
        conv.args = tuple(args)
    bn.replace_all_uses_with(conv)
    for spec in ir.program.graph_signature.output_specs:
        if getattr(spec.arg, "name", None) == bn.name:
            spec.arg.name = conv.name
    ir.graph.erase_node(bn)
    return True
