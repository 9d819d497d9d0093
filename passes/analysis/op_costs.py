"""Work per ATen op: multiply-accumulates, FLOPs and which ops move no data at all.

Counts come from the static shapes in ``node.meta["val"]`` (fake tensors recorded by
``torch.export``), so nothing is executed. Matrix ops count exactly (2 FLOPs per MAC, plus the
bias add); pointwise ops count FLOPs per output element with a small factor for
transcendental functions, which matters little since those ops are bandwidth bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.fx import Node
from torch.utils.flop_counter import conv_flop_count

from slimc.ir import hinted_numel, hinted_shape

#: Ops that only reinterpret or alias memory (or are assertions): no traffic, no kernel.
FREE_OPS = frozenset({
    "aten.view", "aten._unsafe_view", "aten.reshape", "aten.unsqueeze", "aten.squeeze",
    "aten.expand", "aten.permute", "aten.transpose", "aten.t", "aten.slice", "aten.select",
    "aten.alias", "aten.detach", "aten._assert_tensor_metadata", "aten.dropout",
    "aten.lift_fresh_copy", "aten.unbind", "aten.split", "aten.chunk", "aten.split_with_sizes",
    "aten.flatten", "aten.unflatten", "aten.view_as", "aten.expand_as", "aten.as_strided",
    "getitem", "aten.sym_size", "aten._assert_scalar", "wrap_with_set_grad_enabled",
    "aten.contiguous", "aten.lift_fresh",
})

#: FLOPs per output element of pointwise / normalisation ops beyond the default of 1.
POINTWISE_FLOPS: dict[str, int] = {
    "aten.gelu": 8, "aten.silu": 4, "aten.sigmoid": 4, "aten.tanh": 4, "aten.exp": 4,
    "aten.softmax": 5, "aten._softmax": 5, "aten.log_softmax": 5, "aten._log_softmax": 5,
    "aten.layer_norm": 8, "aten.native_layer_norm": 8, "aten.group_norm": 8,
    "aten.batch_norm": 4, "aten._native_batch_norm_legit_no_training": 4, "aten.rsqrt": 2,
    "aten.pow": 2, "aten.erf": 4, "aten.rms_norm": 5,
}

#: Ops whose work is matrix multiplication (these run on tensor cores / the FMA units at peak).
MATRIX_OPS = frozenset({
    "aten.linear", "aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.matmul",
    "aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution", "aten.conv_transpose1d",
    "aten.conv_transpose2d", "aten.scaled_dot_product_attention", "aten.einsum",
    # slimc's quantized linears (``quantize``): same MACs as the linear they replaced
    "slimc.linear_int8", "slimc.linear_int4", "slimc.linear_w8a8", "slimc.linear_fp16",
    "slimc.linear_bf16", "slimc.linear_lowbit",
})


def tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a node's ``meta["val"]`` (a tensor, or a tuple/list of them)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors(item)


def _shape(node: Any) -> tuple[int, ...] | None:
    if isinstance(node, Node) and isinstance(node.meta.get("val"), torch.Tensor):
        return hinted_shape(node.meta["val"])
    return None


def _numel(shape: tuple[int, ...] | None) -> int:
    return math.prod(shape) if shape else (1 if shape == () else 0)


def matrix_macs(op: str, node: Node) -> tuple[int, int]:
    """(MACs, extra FLOPs beyond 2 per MAC) of a matrix op; (0, 0) when shapes are unknown."""
    args = node.args
    out = _shape(node)
    if op == "aten.linear":
        x, w = _shape(args[0]), _shape(args[1])
        if not x or not w:
            return 0, 0
        rows = _numel(x) // x[-1]
        bias = len(args) > 2 and args[2] is not None
        return rows * w[0] * x[-1], rows * w[0] if bias else 0
    if op.startswith("slimc.linear_"):
        x = _shape(args[0])
        return (_numel(out) * x[-1], 0) if x and out else (0, 0)
    if op in ("aten.mm", "aten.bmm", "aten.matmul"):
        a = _shape(args[0])
        return (_numel(out) * a[-1], 0) if a and out else (0, 0)
    if op in ("aten.addmm", "aten.baddbmm"):
        a = _shape(args[1])
        return (_numel(out) * a[-1], _numel(out)) if a and out else (0, 0)
    if "conv" in op:
        x, w = _shape(args[0]), _shape(args[1])
        if not x or not w or not out:
            return 0, 0
        transposed = "transpose" in op or (op == "aten.convolution" and bool(args[6]))
        flops = conv_flop_count(list(x), list(w), list(out), transposed)
        bias = len(args) > 2 and args[2] is not None
        return flops // 2, _numel(out) if bias else 0
    if op == "aten.scaled_dot_product_attention":
        q, k, v = (_shape(a) for a in args[:3])
        if not q or not k or not v:
            return 0, 0
        batch = _numel(q[:-2])
        scores = batch * q[-2] * k[-2]
        return scores * (q[-1] + v[-1]), 5 * scores
    return 0, 0


def op_flops(op: str, node: Node) -> tuple[int, int]:
    """(MACs, FLOPs) of one call_function node."""
    if op in FREE_OPS:
        return 0, 0
    if op in MATRIX_OPS:
        macs, extra = matrix_macs(op, node)
        return macs, 2 * macs + extra
    if op == "aten.embedding":
        return 0, 0
    out = sum(hinted_numel(t) for t in tensors(node.meta.get("val")))
    if op in ("aten.sum", "aten.mean", "aten.amax", "aten.max", "aten.min", "aten.var",
              "aten.cumsum", "aten.norm", "aten.linalg_vector_norm"):
        source = _shape(node.args[0]) if node.args else None
        return 0, max(_numel(source), out)
    return 0, out * POINTWISE_FLOPS.get(op, 1)
