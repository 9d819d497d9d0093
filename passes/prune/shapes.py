"""Physically remove pruned channels: slice weights, rewrite shape constants, re-infer shapes.

The label tensors from :mod:`labels` say, for every element of every affected activation, which
channel it carries. Dropping the removed channels from a label tensor must leave a sub-grid;
its extent per dimension *is* the node's new shape. So shape constants are not patched by
pattern (``num_heads * head_dim``...) but recomputed: a ``view`` gets its node's new shape, an
``expand`` the same with its ``-1`` entries kept, a ``split`` the new chunk sizes, a ``slice``
re-based start/end, LayerNorm its ``normalized_shape``, a depthwise conv its ``groups``. After
the edit, fake-tensor propagation refreshes every ``node.meta["val"]`` and the predicted shapes
are checked against it, so a wrong rewrite fails here and not in TVM.
"""

from __future__ import annotations

import torch
from slimc.passes.prune.labels import Propagation, op_name
from torch.fx import Node

from slimc.ir import IR, hinted_shape, refresh_meta  # noqa: F401 - refresh_meta: moved to the IR

aten = torch.ops.aten


class ShapeRewriteError(RuntimeError):
    """Removing the chosen channels would leave a tensor that is not a sub-grid."""


def removed_mask(prop: Propagation, roots, removed_roots: set[int]) -> torch.Tensor:
    """Bool per channel id: True when its unit is removed.

    The copies of a repeated K/V head (GQA, :class:`labels.Repeat`) are removed with their
    source, and otherwise by count: if ``c`` of the query heads reading a K/V head's copies
    are removed, its *last* ``c`` copies go (copies are identical, and the kept query heads
    of each KV group keep their order, so they pair with the first copies). ``c`` must be the
    same for every kept KV head of the attention, and a removed KV head takes all its query
    heads: anything else is not expressible as a smaller ``n_rep`` and raises."""
    root_t = torch.as_tensor(roots)
    marks = torch.zeros(int(root_t.max()) + 1 if len(root_t) else 1, dtype=torch.bool)
    if removed_roots:
        marks[torch.tensor(sorted(removed_roots))] = True
    removed = marks[root_t]
    for rep in prop.repeats:
        if rep.collapsed:
            continue
        gone = removed[rep.source]
        tied = rep.ties >= 0
        readers_gone = tied & removed[rep.ties.clamp(min=0)]
        if bool((gone[:, None] & tied & ~readers_gone).any()):
            raise ShapeRewriteError(f"{rep.node}: a K/V head is removed but query heads "
                                    f"reading it are kept")
        counts = readers_gone.sum(1)[~gone]
        c = int(counts[0]) if len(counts) else 0
        if bool((counts != c).any()):
            raise ShapeRewriteError(f"{rep.node}: query heads must be removed evenly from "
                                    f"every KV group (removed per group: "
                                    f"{sorted(set(counts.tolist()))})")
        if len(counts) and c >= rep.n:
            raise ShapeRewriteError(f"{rep.node}: every query head of a kept KV group removed")
        slot_gone = torch.arange(rep.n) >= rep.n - c
        removed[rep.virtual] = gone[:, None] | slot_gone[None, :]
    return removed


def keep_along(labels: torch.Tensor, removed: torch.Tensor) -> list[torch.Tensor]:
    """Per dim, which indices survive; raises if the survivors are not a sub-grid."""
    if labels.numel() == 0:  # an empty tensor (Phi-3's empty past/rope slices): no channels
        return [torch.ones(n, dtype=torch.bool) for n in labels.shape]
    drop = (labels >= 0) & removed[labels.clamp(min=0)]
    keep = ~drop
    per_dim = []
    for d in range(keep.dim()):
        others = [i for i in range(keep.dim()) if i != d]
        per_dim.append(keep.amax(dim=others) if others else keep)
    expected = 1
    for k in per_dim:
        expected *= int(k.sum())
    if int(keep.sum()) != expected:
        raise ShapeRewriteError("pruned channels do not form whole slices of a tensor")
    return per_dim


def new_shapes(prop: Propagation, removed: torch.Tensor) -> dict[str, tuple | list]:
    """Predicted shape (or list of shapes for tuple outputs) of every labelled node."""
    out: dict[str, tuple | list] = {}
    for name, lab in prop.labels.items():
        if isinstance(lab, tuple):
            out[name] = [tuple(int(k.sum()) for k in keep_along(t, removed)) for t in lab]
        else:
            out[name] = tuple(int(k.sum()) for k in keep_along(lab, removed))
    return out


def slice_weights(ir: IR, prop: Propagation, removed: torch.Tensor) -> int:
    """Cut removed slices out of every member weight; returns scalars removed."""
    before = ir.num_params()
    nodes = {n.name: n for n in ir.nodes("placeholder")}
    cuts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for (weight, axis), ids in prop.members.items():
        drop = (ids >= 0) & removed[ids.clamp(min=0)]
        if bool(drop.any()):
            cuts.setdefault(weight, []).append((axis, (~drop).nonzero().reshape(-1)))
    for weight, axes in cuts.items():
        node = nodes[weight]
        value = ir.get_weight(node)
        for axis, keep in axes:
            value = value.index_select(axis, keep)
        ir.set_weight(node, value.contiguous())
    return before - ir.num_params()


def rewrite_constants(ir: IR, prop: Propagation, removed: torch.Tensor,
                      shapes: dict[str, tuple | list]) -> int:
    """Rewrite the shape arguments of nodes whose sizes change; returns how many changed."""
    changed = 0
    for node in list(ir.nodes("call_function")):
        if node.name not in prop.rewrites and node.name not in prop.labels:
            continue
        if _rewrite(node, prop, removed, shapes):
            changed += 1
    return changed


def _old_shape(node: Node):
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return hinted_shape(val)
    if isinstance(val, (tuple, list)):
        return [hinted_shape(v) for v in val]
    return None


def _input_keep(node: Node, prop: Propagation, removed: torch.Tensor, dim: int):
    lab = prop.labels.get(node.args[0].name) if isinstance(node.args[0], Node) else None
    if lab is None:
        return None
    return keep_along(lab, removed)[dim % lab.dim()]


def _rewrite(node: Node, prop: Propagation, removed: torch.Tensor, shapes) -> bool:
    op = op_name(node)
    new, old = shapes.get(node.name), _old_shape(node)
    args = list(node.args)
    if op in ("aten.view", "aten.reshape", "aten._unsafe_view") and new != old:
        args[1] = _sizes(args[1], new, old)
    elif op == "aten.expand" and new != old:
        args[1] = [-1 if isinstance(s, int) and s == -1 else n
                   for s, n in zip(args[1], _sizes(args[1], new, old), strict=True)]
    elif op == "aten.unflatten" and new != old:
        dim = args[1] % len(new)
        args[2] = _sizes(args[2], new[dim:dim + len(args[2])], old[dim:dim + len(args[2])])
    elif op in ("aten.split", "aten.split_with_sizes", "aten.chunk") and new != old:
        dim = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
        sizes = [s[dim] for s in new]
        node.target = aten.split_with_sizes.default
        args = [args[0], sizes, dim]
        node.kwargs = {}
    elif op in ("aten.slice", "aten.narrow", "aten.select"):
        return _rewrite_index(node, prop, removed, args)
    elif op in ("aten.layer_norm", "aten.native_layer_norm"):
        in_shape = shapes.get(args[0].name) if isinstance(args[0], Node) else None
        if in_shape is None:
            return False
        if list(args[1]) == [in_shape[-1]]:
            return False
        args[1] = [in_shape[-1]]
    elif op in ("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution"):
        index = 8 if op == "aten.convolution" else 6
        if len(args) <= index or args[index] == 1 or new == old:
            return False
        args[index] = new[1]
    else:
        return False
    node.args = tuple(args)
    return True


def _sizes(sizes, new, old) -> list:
    """The new size list of a view/expand/unflatten: ``new`` where pruning changed a dim, the
    original entry where it did not, so a size computed in the graph (a ``sym_size`` Node of a
    dynamic batch or sequence, which pruning never changes) stays symbolic and ``-1`` stays
    inferred rather than baked in at the example size."""
    sizes = list(sizes)
    if len(sizes) != len(new) or len(old) != len(new):
        return list(new)
    return [s if n == o and (isinstance(s, Node) or s == -1) else n
            for s, n, o in zip(sizes, new, old, strict=True)]


def _rewrite_index(node: Node, prop: Propagation, removed: torch.Tensor, args: list) -> bool:
    op = op_name(node)
    dim = args[1] if len(args) > 1 else 0
    keep = _input_keep(node, prop, removed, dim)
    if keep is None or bool(keep.all()):
        return False
    before = torch.cat([torch.zeros(1, dtype=torch.long), keep.long().cumsum(0)])
    n = len(keep)
    if op == "aten.select":
        args[2] = int(before[args[2] % n])
    elif op == "aten.narrow":
        start, length = args[2] % n, args[3]
        args[2], args[3] = int(before[start]), int(before[start + length] - before[start])
    else:
        start = args[2] if len(args) > 2 and args[2] is not None else 0
        end = args[3] if len(args) > 3 and args[3] is not None else n
        step = args[4] if len(args) > 4 else 1
        if step != 1:
            raise ShapeRewriteError(f"{node.name}: strided slice over pruned channels")
        start = min(max(start + n if start < 0 else start, 0), n)
        end = min(max(end + n if end < 0 else end, 0), n)
        args[2:4] = [int(before[start]), int(before[end])]
    node.args = tuple(args)
    return True


def check_shapes(ir: IR, shapes: dict[str, tuple | list]) -> None:
    """Every node's inferred shape must be the one the labels predicted."""
    for node in ir.nodes("call_function"):
        want = shapes.get(node.name)
        if want is None:
            continue
        got = _old_shape(node)
        if got is not None and list(got) != list(want) and got != want:
            raise ShapeRewriteError(f"{node.name}: shape {got} after pruning, expected {want}")
