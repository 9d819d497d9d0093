"""Fold inference-mode batch norm into the convolution or linear before it (run by ``quantize``
first).

A convolution followed by ``batch_norm`` computes ``(conv(x, W) + b - mean) * g / sqrt(var +
eps) + beta``: one convolution with ``W * s`` (``s`` per output channel) and a new bias. Folding
first means the quantizer rounds the weight the model really applies (a channel that batch norm
scales up by 10x would otherwise have its rounding error scaled up too), and the batch norm's
four vectors leave the artifact. The same rewrite as the ``fold-batchnorm`` example plugin,
built in so ``quantize`` does not depend on a plugin being installed.

A ``linear`` is folded the same way (its output features are the channels), also through a
reshape that only merges leading dimensions: ``BatchNorm1d`` over tokens is written
``bn(linear(x).flatten(0, 1)).reshape_as(...)`` (LeViT's batch-normed linears), and unfolded it
is a separate elementwise kernel after every matmul (a reshape ends the matmul's epilogue), one
more read and write of each activation. Once folded, ``flatten(linear(x), 0, 1).reshape_as(
linear(x))`` is a round trip to the linear's own shape, so its users read the linear directly
(:func:`_drop_round_trip`): here, on the FX graph, ``replace_all_uses_with`` is exact, whereas
dropping a ``reshape(y, shape(y))`` after lowering binds one Relax var to another, which
``FuseTIR`` rejects in quantized models ("Inconsistent buffers ... mapped to the same relax var",
the lv16 revert).
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


#: Reshapes a batch norm may see a linear's output through, when they keep its last axis.
_ROW_VIEWS = {"aten.flatten", "aten.view", "aten.reshape", "aten._unsafe_view"}


def _linear_through_rows(x) -> Node | None:
    """The ``linear`` whose output features are channel axis 1 of the 2-D batch norm input
    ``x``: ``x`` itself, or a single-use reshape of it that keeps the last axis (so every row of
    ``x`` is one output row of the linear)."""
    if not isinstance(x, Node) or x.op != "call_function":
        return None
    shape = getattr(x.meta.get("val"), "shape", None)
    if shape is None or len(shape) != 2:
        return None
    src = x
    if op_name(x) in _ROW_VIEWS:
        src = x.args[0]
        src_shape = getattr(getattr(src, "meta", {}).get("val"), "shape", None)
        # plain ints only: comparing a symbolic size would pin it
        if not isinstance(src, Node) or src_shape is None or _value_readers(src) != 1 \
                or not isinstance(src_shape[-1], int) or not isinstance(shape[-1], int) \
                or src_shape[-1] != shape[-1]:
            return None
    if src.op != "call_function" or op_name(src) != "aten.linear" or _value_readers(src) != 1:
        return None
    return src


def _value_readers(node: Node) -> int:
    """Users of ``node`` that read its values: ``y.reshape_as(node)`` reads only its shape,
    which folding does not change (``bn(x.flatten(0, 1)).reshape_as(x)``)."""
    return sum(1 for u in node.users
               if not (op_name(u) == "aten.reshape_as" and u.args[0] is not node))


def _fold(ir: IR, bn: Node) -> bool:
    conv, gamma, beta, mean, var, training, _momentum, eps = bn.args[:8]
    if training or not isinstance(conv, Node) or conv.op != "call_function" \
            or mean is None or var is None:
        return False
    if op_name(conv) not in CONV_OPS:
        linear = _linear_through_rows(conv)
        if linear is None or len(conv.users) != 1:
            return False
        if not _fold_into(ir, bn, linear, weight_at=1, bias_at=2, replacement=conv):
            return False
        _drop_round_trip(ir, conv, linear)
        return True
    if len(conv.users) != 1:
        return False
    if op_name(conv) == "aten.convolution" and conv.args[6]:
        return False  # transposed: output channels are on axis 1 of the weight
    return _fold_into(ir, bn, conv, weight_at=1, bias_at=2, replacement=conv)


def _fold_into(ir: IR, bn: Node, conv: Node, weight_at: int, bias_at: int,
               replacement: Node) -> bool:
    """Scale ``conv``'s weight (output channels on axis 0) and bias by ``bn``'s affine map and
    let ``bn``'s users read ``replacement`` (``conv`` or a reshape of it) instead."""
    _x, gamma, beta, mean, var, _training, _momentum, eps = bn.args[:8]
    weight_node = conv.args[weight_at]
    bias_node = conv.args[bias_at] if len(conv.args) > bias_at else None
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
        args = list(conv.args) + [None] * (bias_at + 1 - len(conv.args))
        args[bias_at] = ir.add_weight(f"{weight_node.name}_folded_bias", new_bias)
        conv.args = tuple(args)
    bn.replace_all_uses_with(replacement)
    for spec in ir.program.graph_signature.output_specs:
        if getattr(spec.arg, "name", None) == bn.name:
            spec.arg.name = replacement.name
    ir.graph.erase_node(bn)
    return True


def _static_shape(node) -> tuple | None:
    shape = getattr(getattr(node, "meta", {}).get("val"), "shape", None)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None  # symbolic sizes: comparing them would pin them
    return tuple(shape)


def _drop_round_trip(ir: IR, view: Node, source: Node) -> None:
    """Let the users of a reshape of ``view`` (itself a single-use reshape of ``source``) back to
    ``source``'s own shape read ``source``: both are row-major views, so the pair is the
    identity. Only reshapes to a static shape equal to ``source``'s are dropped."""
    if view is source or len(view.users) != 1:
        return
    (back,) = view.users
    if back.op != "call_function" or back.args[0] is not view \
            or op_name(back) not in _ROW_VIEWS | {"aten.reshape_as"}:
        return
    shape = _static_shape(source)
    if shape is None or _static_shape(back) != shape:
        return
    back.replace_all_uses_with(source)
    for spec in ir.program.graph_signature.output_specs:
        if getattr(spec.arg, "name", None) == back.name:
            spec.arg.name = source.name
    ir.graph.erase_node(back)
    ir.graph.erase_node(view)
