"""Rewrite ATen graphs into the subset TVM's ``from_exported_program`` lowers correctly.

Each rule is a small function ``rule(ir, node) -> bool`` that rewrites one node in place, keeps
the graph semantically identical under PyTorch, and documents which TVM failure it avoids. The
pass is ``exact``: the pass manager checks the IR's outputs did not change.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch.fx import Node

from slimc.ir import IR
from slimc.passmanager import PassContext, PassOptions, PreservedAnalyses, TransformPass

aten = torch.ops.aten


def view_to_reshape(ir: IR, node: Node) -> bool:
    """``aten.view`` -> ``aten.reshape``.

    TVM re-runs ATen decompositions, whose fake-tensor ``view`` insists on the strides the
    original tensor had; after a transpose it fails ("Cannot view a tensor with shape ... and
    strides ..."), which broke GPT-2. ``reshape`` has the same values and no stride rule.
    """
    if node.target is not aten.view.default:
        return False
    node.target = aten.reshape.default
    return True


def cumsum_of_bool_as_int64(ir: IR, node: Node) -> bool:
    """Cast a boolean/small-int ``cumsum`` input to int64 first, as PyTorch does implicitly.

    Without a ``dtype`` argument, torch accumulates bool/int tensors in int64; TVM's converter
    keeps the input dtype and LLVM codegen then fails (``CreateAdd ... kDLFloat``). Transformers'
    position ids from a padding mask (Llama, Qwen2, Mistral, Gemma, Phi, GPT-NeoX) hit this.
    """
    if node.target is not aten.cumsum.default:
        return False
    src = node.args[0]
    val = src.meta.get("val") if isinstance(src, Node) else None
    if val is None or val.dtype in (torch.int64, torch.float32, torch.float64, torch.float16,
                                    torch.bfloat16):
        return False
    if node.kwargs.get("dtype") is not None:
        return False
    with ir.graph.inserting_before(node):
        cast = ir.graph.call_function(aten._to_copy.default, (src,), {"dtype": torch.int64})
    cast.meta["val"] = val.to(torch.int64)
    node.replace_input_with(src, cast)
    return True


def negative_index_tensor_wrapped(ir: IR, node: Node) -> bool:
    """``x[idx]`` with an index tensor: wrap negative entries (``idx + size``) first.

    PyTorch reads ``x[-1]`` from the end; TVM imports ``aten.index`` as ``take``, whose index
    :func:`~slimc.backends.tvm.bounds.clamp_gathers` clamps to row 0, so a model indexing with
    ``tensor([-1, 0])`` got a library that ran and returned the wrong rows. The wrap is a
    ``where`` on the (small) index tensor; non-negative indices are unchanged.
    """
    if node.target is not aten.index.Tensor or node.meta.get("slimc_wrapped"):
        return False
    src, indices = node.args[0], list(node.args[1])
    src_val = src.meta.get("val") if isinstance(src, Node) else None
    if src_val is None:
        return False
    changed = False
    for dim, index in enumerate(indices):
        val = index.meta.get("val") if isinstance(index, Node) else None
        if val is None or val.dtype not in (torch.int64, torch.int32):
            continue
        size = src_val.shape[dim]
        if isinstance(size, torch.SymInt):
            continue  # a dynamic axis: left as it was
        with ir.graph.inserting_before(node):
            negative = ir.graph.call_function(aten.lt.Scalar, (index, 0))
            shifted = ir.graph.call_function(aten.add.Scalar, (index, int(size)))
            wrapped = ir.graph.call_function(aten.where.self, (negative, shifted, index))
        negative.meta["val"] = val < 0
        shifted.meta["val"] = val + int(size)
        wrapped.meta["val"] = val.clone()
        indices[dim] = wrapped
        changed = True
    if changed:
        node.args = (src, indices, *node.args[2:])
        node.meta["slimc_wrapped"] = True
    return changed


#: Element-wise binary ATen ops whose operands torch promotes to one dtype (its type promotion
#: rules: an integer tensor times a float scalar is float, ``int / int`` is float).
_PROMOTING = {
    getattr(getattr(aten, op), kind)
    for op, kinds in {
        "add": ("Tensor", "Scalar"), "sub": ("Tensor", "Scalar"), "rsub": ("Tensor", "Scalar"),
        "mul": ("Tensor", "Scalar"), "div": ("Tensor", "Scalar", "Tensor_mode", "Scalar_mode"),
        "remainder": ("Tensor", "Scalar"), "floor_divide": ("default", "Scalar"),
        "pow": ("Tensor_Tensor", "Tensor_Scalar", "Scalar"),
        "maximum": ("default",), "minimum": ("default",),
        "eq": ("Tensor", "Scalar"), "ne": ("Tensor", "Scalar"), "lt": ("Tensor", "Scalar"),
        "le": ("Tensor", "Scalar"), "gt": ("Tensor", "Scalar"), "ge": ("Tensor", "Scalar"),
    }.items() for kind in kinds if hasattr(getattr(aten, op), kind)
}
#: True division: integer operands divide as floats (``torch.get_default_dtype()``).
_TRUE_DIV = {aten.div.Tensor, aten.div.Scalar}


def _type_stand_in(value):
    """``value`` as ``torch.result_type`` takes it: a tensor's fake value, or a plain Python
    number for a (symbolic) scalar; None for anything else."""
    if isinstance(value, Node):
        value = value.meta.get("val")
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (bool, torch.SymBool)):
        return True
    if isinstance(value, (int, torch.SymInt)):
        return 1
    if isinstance(value, (float, torch.SymFloat)):
        return 1.0
    return None


def binary_operands_in_promoted_dtype(ir: IR, node: Node) -> bool:
    """Cast a tensor operand of an element-wise binary op to the dtype torch promotes to.

    TVM's importer converts a Python scalar to the *tensor's* dtype (``relax.const(rhs,
    lhs.dtype)``) and divides integer tensors as integers, where torch promotes: ``int64 /
    int`` and ``int64 * 0.5`` are float. DeBERTa-v2/v3's log-bucketed relative positions
    (``torch.log(abs_pos / mid)``) failed to import ("relax.log requires the input tensor to
    have float dtype"); the same mismatch elsewhere would silently truncate. With the operand
    cast first, TVM's dtype and torch's agree.
    """
    if node.target not in _PROMOTING or len(node.args) < 2:
        return False
    operands = list(node.args[:2])
    stand_ins = [_type_stand_in(a) for a in operands]
    if any(v is None for v in stand_ins) or not any(
            isinstance(a, Node) and isinstance(v, torch.Tensor)
            for a, v in zip(operands, stand_ins, strict=True)):
        return False
    try:
        want = torch.result_type(*stand_ins)
    except (TypeError, RuntimeError):
        return False
    if node.target in _TRUE_DIV and not want.is_floating_point:
        want = torch.get_default_dtype()
    changed = False
    for i, (arg, val) in enumerate(zip(operands, stand_ins, strict=True)):
        if not isinstance(arg, Node) or not isinstance(val, torch.Tensor) or val.dtype == want:
            continue
        with ir.graph.inserting_before(node):
            cast = ir.graph.call_function(aten._to_copy.default, (arg,), {"dtype": want})
        cast.meta["val"] = val.to(want)
        node.update_arg(i, cast)
        changed = True
    return changed


def descending_arange_as_ascending(ir: IR, node: Node) -> bool:
    """``arange(start, end, step < 0)`` -> ``arange(0, n) * step + start`` (integer dtypes).

    TVM's ``relax.op.arange`` sizes a descending range wrongly: ``arange(16, -16, -1)`` has 32
    values, TVM's result type says 34, and the broadcast after it fails to import (Funnel
    Transformer's relative positions). An ascending ``arange(0, n)`` of torch's length, scaled
    and shifted, has the same values. Only a static length and constant start/step.
    """
    if node.target is not aten.arange.start_step:
        return False
    start, _end, step = (list(node.args) + [1])[:3]
    out_val = node.meta.get("val")
    if (not isinstance(step, int) or isinstance(step, bool) or step >= 0
            or not isinstance(start, int) or out_val is None or out_val.dim() != 1
            or not isinstance(out_val.shape[0], int) or out_val.dtype.is_floating_point):
        return False
    with ir.graph.inserting_before(node):
        ascending = ir.graph.call_function(aten.arange.start_step,
                                           (0, int(out_val.shape[0]), 1), dict(node.kwargs))
        scaled = ir.graph.call_function(aten.mul.Tensor, (ascending, step))
        shifted = ir.graph.call_function(aten.add.Tensor, (scaled, start))
    for new in (ascending, scaled, shifted):
        new.meta["val"] = out_val
    node.replace_all_uses_with(shifted)
    ir.graph.erase_node(node)
    return True


def im2col_as_strided_slices(ir: IR, node: Node) -> bool:
    """``aten.im2col`` (``nn.functional.unfold``) -> pad, one strided slice per kernel tap,
    ``stack`` and ``reshape``.

    TVM has no ``im2col`` converter; the importer's ATen decomposition of it gathers with index
    tensors its ``index_tensor`` cannot broadcast ("cannot broadcast index shapes ... 16 vs
    9": ConvBERT's span-based dynamic convolution). Tap ``(i, j)`` of output column ``(y, x)``
    is ``padded[..., i*dh + y*sh, j*dw + x*sw]``: a slice from ``i*dh`` that stops
    ``(kh-1-i)*dh`` before the padded end, step ``sh`` -- exactly ``out_h`` rows, also for a
    symbolic height. Taps are stacked after the channel axis, the order ``unfold`` uses
    (``c * kh * kw + i * kw + j``). Gathers only: exact.
    """
    if node.target is not aten.im2col.default:
        return False
    src, kernel, dilation, padding, stride = node.args[:5]
    src_val = src.meta.get("val") if isinstance(src, Node) else None
    out_val = node.meta.get("val")
    if (src_val is None or out_val is None or src_val.dim() != 4
            or not all(isinstance(d, int) for d in src_val.shape)):
        return False  # a symbolic height: the new nodes' sizes would name torch's symbols
    (kh, kw), (dh, dw) = _pair(kernel, 2), _pair(dilation, 2)
    (ph, pw), (sh, sw) = _pair(padding, 2), _pair(stride, 2)
    graph = ir.graph

    def emit(target, args, val):
        new = graph.call_function(target, args)
        new.meta["val"] = val
        return new

    with graph.inserting_before(node):
        padded, padded_val = src, src_val
        if ph or pw:
            padded_val = torch.ops.aten.constant_pad_nd(src_val, [pw, pw, ph, ph], 0.0)
            padded = emit(aten.constant_pad_nd.default, (src, [pw, pw, ph, ph], 0.0),
                          padded_val)
        taps = []
        for i in range(kh):
            rows_end = -(kh - 1 - i) * dh or _TO_END
            rows_val = torch.ops.aten.slice(padded_val, 2, i * dh, rows_end, sh)
            rows = emit(aten.slice.Tensor, (padded, 2, i * dh, rows_end, sh), rows_val)
            for j in range(kw):
                cols_end = -(kw - 1 - j) * dw or _TO_END
                tap_val = torch.ops.aten.slice(rows_val, 3, j * dw, cols_end, sw)
                taps.append(emit(aten.slice.Tensor, (rows, 3, j * dw, cols_end, sw), tap_val))
        stacked_val = torch.ops.aten.stack([t.meta["val"] for t in taps], 2)
        stacked = emit(aten.stack.default, (taps, 2), stacked_val)
        result = emit(aten.reshape.default, (stacked, list(out_val.shape)), out_val)
    node.replace_all_uses_with(result)
    graph.erase_node(node)
    return True


#: ``slice``'s end for "to the end of the axis" (as torch.export writes it).
_TO_END = 9223372036854775807


def index_with_leading_none_to_index_select(ir: IR, node: Node) -> bool:
    """``x[:, :, idx]`` (``aten.index`` with ``None`` before one index tensor) ->
    ``index_select`` (+ ``reshape`` for a multi-dimensional ``idx``).

    TVM's ``index.Tensor`` converter ignores the ``None`` placeholders and indexes the wrong
    axis, producing a library that runs but computes garbage (Falcon's fused QKV split). The
    verification caught it; this rewrite makes it correct.
    """
    if node.target is not aten.index.Tensor:
        return False
    src, indices = node.args[0], list(node.args[1])
    present = [i for i, ix in enumerate(indices) if ix is not None]
    if len(present) != 1 or present[0] == 0:
        return False
    dim = present[0]
    index = indices[dim]
    index_val = index.meta.get("val") if isinstance(index, Node) else None
    if index_val is None or index_val.dtype not in (torch.int64, torch.int32):
        return False
    src_val = src.meta["val"]
    out_val = node.meta["val"]
    if isinstance(src_val.shape[dim], torch.SymInt):
        return False  # a dynamic table length: int() would specialise it
    with ir.graph.inserting_before(node):
        flat = index
        if index_val.dim() != 1:
            flat = ir.graph.call_function(aten.reshape.default, (index, [-1]))
            flat.meta["val"] = index_val.reshape(-1)
        # aten.index accepts negative positions, index_select does not: wrap them.
        wrapped = ir.graph.call_function(aten.remainder.Scalar, (flat, int(src_val.shape[dim])))
        wrapped.meta["val"] = flat.meta["val"]
        flat = wrapped
        picked = ir.graph.call_function(aten.index_select.default, (src, dim, flat))
        picked.meta["val"] = src_val.index_select(dim, flat.meta["val"])
        result = picked
        if index_val.dim() != 1:
            result = ir.graph.call_function(aten.reshape.default,
                                            (picked, list(out_val.shape)))
            result.meta["val"] = out_val
    node.replace_all_uses_with(result)
    ir.graph.erase_node(node)
    return True


def cat_without_empty_vectors(ir: IR, node: Node) -> bool:
    """``cat([empty 1-D, x, ...])`` -> ``cat([x, ...])`` (or ``x`` alone, cast to the result's
    dtype).

    torch skips 1-D operands of size 0 in ``cat`` whatever the other operands' rank (a legacy
    rule that Hugging Face's lazily initialised ``DynamicCache`` relies on: its first
    ``update`` concatenates ``torch.tensor([])`` with the keys); TVM's ``concat`` requires
    equal ranks ("Concat expects the input tensors to have the same ndim ... 1 and 4": XLM,
    whose forward creates a cache by default). Dropping them gives the same values.
    """
    if node.target is not aten.cat.default or not node.args or len(node.args[0]) < 2:
        return False
    tensors = list(node.args[0])
    vals = [t.meta.get("val") if isinstance(t, Node) else None for t in tensors]
    out_val = node.meta.get("val")
    if out_val is None or any(v is None for v in vals) or out_val.dim() <= 1:
        return False
    kept = [t for t, v in zip(tensors, vals, strict=True)
            if not (v.dim() == 1 and isinstance(v.shape[0], int) and v.shape[0] == 0)]
    if not kept or len(kept) == len(tensors):
        return False
    if len(kept) > 1:
        node.args = (kept, *node.args[1:])
        return True
    result = kept[0]
    if result.meta["val"].dtype != out_val.dtype:
        with ir.graph.inserting_before(node):
            result = ir.graph.call_function(aten._to_copy.default, (result,),
                                            {"dtype": out_val.dtype})
        result.meta["val"] = out_val
    node.replace_all_uses_with(result)
    ir.graph.erase_node(node)
    return True


def whole_window_avg_pool_to_mean(ir: IR, node: Node) -> bool:
    """``avg_pool{1,2}d`` whose one window covers the whole input -> ``mean`` over it.

    Hugging Face's EfficientNet pools with ``AvgPool2d(1280, ceil_mode=True)`` on a 7x7 map:
    the window is clipped to the input, so the result is the plain mean (divisor 49), but TVM's
    pool kernel walks the full 1280x1280 window with a bounds check per element for each of
    the 1280 channels: 16 s of a 16.2 s EfficientNet-B0 call. ``mean`` is the same value.
    Only unpadded pools with one output position, static sizes and no divisor override.
    """
    spatial = {aten.avg_pool2d.default: 2, aten.avg_pool1d.default: 1}.get(node.target)
    if spatial is None:
        return False
    src = node.args[0]
    src_val = src.meta.get("val") if isinstance(src, Node) else None
    out_val = node.meta.get("val")
    if src_val is None or out_val is None:
        return False
    args = list(node.args) + [None] * (7 - len(node.args))
    kernel = _pair(args[1], spatial)
    padding = _pair(args[3] if args[3] is not None else node.kwargs.get("padding", 0), spatial)
    divisor = args[6] if len(node.args) > 6 else node.kwargs.get("divisor_override")
    sizes = list(src_val.shape[-spatial:])
    if (divisor is not None or any(p != 0 for p in padding)
            or any(not isinstance(n, int) for n in sizes)
            or any(k < n for k, n in zip(kernel, sizes, strict=True))
            or list(out_val.shape[-spatial:]) != [1] * spatial):
        return False
    dims = list(range(-spatial, 0))
    with ir.graph.inserting_before(node):
        mean = ir.graph.call_function(aten.mean.dim, (src, dims, True))
    mean.meta["val"] = out_val
    node.replace_all_uses_with(mean)
    ir.graph.erase_node(node)
    return True


def max_min_dim_values_as_amax(ir: IR, node: Node) -> bool:
    """``x.max(dim).values`` (``aten.max.dim``, only its values read) -> ``aten.amax``; the
    same for ``min.dim`` -> ``amin``.

    ``max.dim`` returns the indices too, and TVM lowers it (and slimc's ``min.dim``,
    :mod:`.torch_semantics`) as a ``topk`` with k = 1: a sort-based kernel. Hiera's pooled
    queries (``view(...).max(dim=...).values``) spent 23 ms of Hiera-Tiny's 70 in six such
    ``topk`` kernels (session 27), where a reduction takes a fraction of a millisecond. Same
    values, NaN included (both propagate it).
    """
    reduce = {aten.max.dim: aten.amax.default, aten.min.dim: aten.amin.default}.get(node.target)
    if reduce is None:
        return False
    users = list(node.users)
    if any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in users):
        return False  # the indices are read (torch.export leaves an unread getitem of them)
    dead = [u for u in users if u.args[1] != 0]
    users = [u for u in users if u.args[1] == 0]
    if not users:
        return False
    src, dim = node.args[0], node.args[1]
    keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim"))
    with ir.graph.inserting_before(node):
        values = ir.graph.call_function(reduce, (src, [dim], keepdim))
    values.meta["val"] = users[0].meta.get("val")
    for user in users:
        user.replace_all_uses_with(values)
        ir.graph.erase_node(user)
    for user in dead:
        ir.graph.erase_node(user)
    ir.graph.erase_node(node)
    return True


def _pair(value, count: int) -> list[int]:
    """An ATen int-list argument (one int, or one per spatial dimension) as ``count`` ints."""
    if isinstance(value, int):
        return [value] * count
    values = [int(v) for v in value]
    return values * count if len(values) == 1 else values


RULES: list[Callable[[IR, Node], bool]] = [
    negative_index_tensor_wrapped,
    view_to_reshape, cumsum_of_bool_as_int64, binary_operands_in_promoted_dtype,
    descending_arange_as_ascending, im2col_as_strided_slices,
    index_with_leading_none_to_index_select, whole_window_avg_pool_to_mean,
    cat_without_empty_vectors, max_min_dim_values_as_amax,
]


def legalize(ir: IR) -> dict[str, int]:
    """Apply every rule to every node; returns how often each rule fired."""
    fired = {rule.__name__: 0 for rule in RULES}
    for node in list(ir.nodes("call_function")):
        for rule in RULES:
            if rule(ir, node):
                fired[rule.__name__] += 1
                if getattr(node, "_erased", False):  # replaced: later rules see the new node
                    break
    ir.changed()
    return fired


class LegalizeForTVM(TransformPass):
    """Rewrite ATen ops that TVM's importer mishandles into equivalent ones it lowers."""

    name = "legalize-for-tvm"
    exact = True

    class Options(PassOptions):
        pass

    def run(self, ir: IR, ctx: PassContext, options: PassOptions) -> PreservedAnalyses:
        fired = legalize(ir)
        ir.annotations.setdefault("legalize-for-tvm", {}).update(fired)
        return PreservedAnalyses.all()  # same ops, same shapes, same values
