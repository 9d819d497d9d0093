"""Group norm as per-channel sums over the map, then a per-channel scale and shift.

TVM legalizes ``relax.nn.group_norm`` into one kernel whose row loop runs over the
``batch x groups`` statistics. With one group (PoolFormer's norm, ``nn.GroupNorm(1, C)``) that
is a single row of the whole map: one thread, the map first copied into a reshaped buffer,
then summed as one scalar dependency chain of ``H x W x C`` adds. PoolFormer-S12's 25 norms
took 4.4 ms of its ~29 ms of kernels that way, 2x ONNX Runtime's InstanceNormalization nodes
(``benchmarks/layer_profile.py --ftz``).

Here the statistics come from two sums over the spatial axes that keep the channel axis
(``sum(x)``, ``sum(x * x)``): a squeeze-like reduction that the pixel-major rule
(:mod:`.pixel_major`) reads in memory order, split by image rows over the threads with vector
accumulators. The per-group mean and inverse deviation are then computed on ``C`` values, and
the map is normalized by one elementwise ``x * scale + shift`` with per-channel ``scale`` and
``shift`` (the affine weight folded in), which is parallel and vectorized like any other
elementwise kernel. The variance is ``E[x^2] - E[x]^2``, the formula TVM's own kernel uses.
Tiny maps keep TVM's single kernel (three kernels' calls would cost more than their sums), and
so do channels-first maps with many groups, whose rows are contiguous and split over threads.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from .common import static_dims

#: Map elements below which TVM's single kernel is kept (a few vectors' worth of sums).
MIN_ELEMENTS = 1 << 12
#: Statistics rows (batch x groups) from which a channels-first norm keeps TVM's row kernel.
MIN_ROWS = 8


def _static_shape(expr: relax.Expr) -> list[int] | None:
    """``expr``'s shape when it is a float32 tensor of static shape."""
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None or str(ty.dtype) != "float32":
        return None
    return static_dims(ty.shape)


def _decompose(call: relax.Call) -> relax.Expr:
    """``call`` (a group norm) as channel sums, group statistics and a scale/shift; or itself."""
    x, gamma, beta = call.args
    attrs = call.attrs
    shape = _static_shape(x)
    if shape is None:
        return call
    rank = len(shape)
    channel = int(attrs.channel_axis) % rank
    axes = sorted(int(a) % rank for a in attrs.axes)
    groups = int(attrs.num_groups)
    if channel in axes or shape[channel] % groups:
        return call
    size = 1
    for d in shape:
        size *= d
    rows = groups
    for i, d in enumerate(shape):
        if i != channel and i not in axes:
            rows *= d
    # a channels-first map with enough rows (wav2vec2's 512 one-channel groups over time) is
    # already a good row kernel: contiguous rows, split over the threads
    if size < MIN_ELEMENTS or (channel != rank - 1 and rows >= MIN_ROWS):
        return call
    per_group = shape[channel] // groups
    count = per_group
    for a in axes:
        count *= shape[a]
    # per-channel sums: the statistics' shape keeps 1s at the reduced axes
    sums = relax.op.sum(x, axis=axes, keepdims=True)
    squares = relax.op.sum(relax.op.multiply(x, x), axis=axes, keepdims=True)
    kept = [1 if i in axes else d for i, d in enumerate(shape)]
    grouped = kept[:channel] + [groups, per_group] + kept[channel + 1:]

    def group_mean(total: relax.Expr) -> relax.Expr:
        per = relax.op.sum(relax.op.reshape(total, grouped), axis=[channel + 1], keepdims=True)
        return relax.op.divide(per, relax.const(float(count), "float32"))

    mean = group_mean(sums)
    variance = relax.op.subtract(group_mean(squares), relax.op.multiply(mean, mean))
    inverse = relax.op.rsqrt(relax.op.add(variance, relax.const(float(attrs.epsilon), "float32")))
    channel_shape = [1] * rank
    channel_shape[channel] = shape[channel]
    grouped_weight = channel_shape[:channel] + [groups, per_group] + channel_shape[channel + 1:]
    scale = inverse
    if attrs.scale:
        scale = relax.op.multiply(scale, relax.op.reshape(gamma, grouped_weight))
    shift = relax.op.negative(relax.op.multiply(mean, scale))
    if attrs.center:
        shift = relax.op.add(shift, relax.op.reshape(beta, grouped_weight))
    scale = relax.op.reshape(relax.op.broadcast_to(scale, grouped), kept)
    shift = relax.op.reshape(relax.op.broadcast_to(shift, grouped), kept)
    return relax.op.add(relax.op.multiply(x, scale), shift)


@tvm.transform.module_pass(opt_level=0, name="slimc.DecomposeGroupNorm")
def decompose_group_norm(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Rewrite every large float32 ``relax.nn.group_norm`` of ``mod`` (:func:`_decompose`)."""
    pattern = is_op("relax.nn.group_norm")(wildcard(), wildcard(), wildcard())
    updates = {}
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewritten = rewrite_call(pattern, lambda call, _m: _decompose(call), func)
            if not rewritten.same_as(func):
                updates[gv] = rewritten
    if not updates:  # no group norm: the module as it came (global infos and all)
        return mod
    mod = mod.shallow_copy() if hasattr(mod, "shallow_copy") else mod
    for gv, func in updates.items():
        mod[gv] = func
    return mod
