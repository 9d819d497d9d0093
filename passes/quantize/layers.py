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
from slimc.layers import Layer, conv_geometry, op_name
from slimc.layers import find_layers as _find
from slimc.lowbit import LOWBIT_KINDS, bits_of

aten = torch.ops.aten


def find_layers(ir: IR, embeddings: bool = True) -> list[Layer]:
    """Layers quantize can rewrite (see :func:`plan`)."""
    return plan(ir, embeddings)[0]


def plan(ir: IR, embeddings: bool = True) -> tuple[list[Layer], dict[str, str]]:
    """Layers quantize can rewrite, and for every other layer (by weight placeholder name) the
    reason it stays as it is."""
    layers, reasons = [], {}
    for layer in _find(ir):
        why = unsupported(layer)
        if why is None and not embeddings and layer.is_embedding:
            why = "embedding table (embeddings=false)"
        if why is None:
            layers.append(layer)
        else:
            reasons[layer.weight.name] = why
    return layers, reasons


def takes_int8_activations(layer: Layer) -> bool:
    """Whether W8A8 can apply to ``layer``: a linear or convolution, or an embedding table
    tied to an output head (the head multiplies int8 codes of its input with the table's own
    per-row int8 codes, which the gathers keep reading; :func:`rewrite` kind ``w8a8``)."""
    return layer.kind in ("linear", "conv") or (layer.is_embedding and bool(layer.linear_nodes))


def unsupported(layer: Layer) -> str | None:
    """Why ``rewrite`` cannot replace ``layer`` (None: it can)."""
    if layer.foreign:
        ops = sorted({op_name(n) for n in layer.foreign})
        return f"also read by {', '.join(ops)} (not a weight op; would keep the fp32 copy)"
    if not layer.consistent:
        return "read both as W and as a transpose of W"
    roles = layer.roles
    if "conv_transpose" in roles:
        return "transposed convolution: no quantized kernel"
    if roles & {"conv", "expert"} and len(roles) > 1:
        return f"one tensor used as {' and '.join(sorted(roles))}"
    if "conv" in roles:
        for use in layer.uses:
            geometry = conv_geometry(use.node, layer.shape)
            if geometry is None:
                return "convolution with symbolic or unsupported arguments"
            if len(geometry.kernel) not in (1, 2):
                return f"{len(geometry.kernel)}-D convolution: no quantized kernel"
    if "expert" in roles:
        if layer.perm not in ((0, 1, 2), (0, 2, 1)):
            return "expert tensor with the expert axis moved"
        if any(op_name(use.via[0]) != "aten.index" for use in layer.uses):
            return "expert tensor permuted before its gather"
    return None


def rewrite(ir: IR, layer: Layer, kind: str, tensors: dict[str, torch.Tensor],
            group_size: int = 0, act_scale: torch.Tensor | None = None,
            zero_point: int = 0, scale_bits: int = 8, per_row: bool = False) -> None:
    """Replace every consumer of ``layer`` by slimc's ``kind`` op reading ``tensors``.

    ``tensors`` holds the packed weight (``weight``) and, for int formats, ``scale`` (and
    ``zero`` for int4), all oriented ``[N, ...]``; ``w8a8`` has ``in_mult [K]`` and
    ``out_scale [N]`` instead of ``scale`` (a tied table's gathers read ``weight`` with its
    per-row ``scale`` as int8). ``scale_bits``: a ``-qs`` grid's code width (its
    codes bit-packed below 8, :mod:`slimc.coded_scales`).
    """
    base = layer.weight_node.name.removeprefix("p_")
    nodes = {key: ir.add_weight(f"{base}_{kind}_{key}", value) for key, value in tensors.items()}
    act_node = ir.add_weight(f"{base}_act_scale", act_scale) if act_scale is not None else None
    if layer.kind == "conv":
        _rewrite_convs(ir, layer, kind, nodes, group_size, zero_point, act_node)
        return
    if layer.kind == "expert":
        _rewrite_experts(ir, layer, kind, nodes, group_size)
        return
    for use in layer.uses:
        node, role = use.node, use.role
        if "scale_code" in tensors:  # a -qs grid: rebuilt before each use from its codes
            like = node.args[1] if role == "embedding" else \
                node.args[1] if node.target is aten.addmm.default else node.args[0]
            groups = -(-int(layer.shape[layer.perm[-1]]) // group_size)
            nodes["scale"], nodes["zero"] = _coded_grid_nodes(ir, nodes, node, like,
                                                              scale_bits, groups)
            nodes["minimum"] = nodes["zero"]
        if role == "embedding":
            ids = node.args[1]
            if kind in ("int8", "w8a8"):
                _replace(ir, node, OPS["embedding_int8"], (nodes["weight"], nodes["scale"], ids))
                continue
            if kind in LOWBIT_KINDS:
                _replace(ir, node, OPS["embedding_lowbit"], (
                    nodes["weight"], nodes["scale"], nodes["minimum"], ids, bits_of(kind),
                    group_size, int(layer.shape[layer.perm[-1]])))
                continue
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
        if kind == "w8a8":  # per_row: dynamic per-token scales (slimc.dialect.linear_w8a8)
            args = (x, nodes["weight"], nodes["in_mult"], nodes["out_scale"], bias,
                    zero_point, *((True,) if per_row else ()))
        elif kind == "int8":
            args = (x, nodes["weight"], nodes["scale"], bias, act_node)
        elif kind == "int4":
            args = (x, nodes["weight"], nodes["scale"], nodes["zero"], bias, act_node,
                    group_size)
        elif kind in LOWBIT_KINDS:
            _replace(ir, node, OPS["linear_lowbit"], (
                x, nodes["weight"], nodes["scale"], nodes["minimum"], bias, act_node,
                bits_of(kind), group_size))
            continue
        else:
            args = (x, nodes["weight"], bias)
        _replace(ir, node, OPS[f"linear_{kind}"], args)
    _erase_dead_views(ir, layer)


def _coded_grid_nodes(ir: IR, nodes: dict[str, Node], before: Node, like: Node,
                      bits: int = 8, groups: int = 0) -> tuple[Node, Node]:
    """``slimc::coded_scale`` nodes rebuilding a ``-qs`` grid's fp16 step and minimum from
    their codes, placed before ``before``; ``like`` is the run-time tensor that consumer reads
    (it keeps TVM from folding the rebuilt grid into stored constants,
    :mod:`slimc.coded_scales`). Codes narrower than 8 bits are bit-packed: the node also
    names their width, the groups per row and whether they are the signed minimum codes."""
    out = []
    for code, unit in (("scale_code", "scale_unit"), ("min_code", "min_unit")):
        args = (nodes[code], nodes[unit], like)
        if bits < 8:
            args += (bits, groups, code == "min_code")
        with ir.graph.inserting_before(before):
            new = ir.graph.call_function(OPS["coded_scale"], args)
        ref = nodes[code].meta.get("val")
        mode = getattr(ref, "fake_mode", None)
        if mode is not None:
            shape = (int(nodes[unit].meta["val"].shape[0]), groups) if bits < 8 else \
                tuple(ref.shape)
            with mode:
                new.meta["val"] = torch.empty(shape, dtype=torch.float16)
        out.append(new)
    return out[0], out[1]


def _rewrite_convs(ir: IR, layer: Layer, kind: str, nodes: dict[str, Node],
                   group_size: int, zero_point: int = 0, act_node: Node | None = None) -> None:
    """``act_node``: AWQ's per-input-channel multiplier ``[1, C, 1(, 1)]``, applied to the
    input by an elementwise ``mul`` before the convolution (the conv ops take none)."""
    if kind not in ("int8", "int4", "w8a8"):
        raise ValueError(f"no quantized convolution for {kind}")
    for use in layer.uses:
        node = use.node
        geometry = conv_geometry(node, layer.shape)
        assert geometry is not None
        bias = node.args[2] if len(node.args) > 2 else None
        x = node.args[0]
        if act_node is not None:
            with ir.graph.inserting_before(node):
                scaled = ir.graph.call_function(aten.mul.Tensor, (x, act_node))
            scaled.meta = dict(x.meta)
            x = scaled
        if kind == "w8a8":
            packed = [nodes["weight"], nodes["in_mult"], nodes["out_scale"]]
        else:
            packed = [nodes["weight"], nodes["scale"]] + ([nodes["zero"]] if kind == "int4"
                                                          else [])
        args = (x, *packed, bias, list(geometry.kernel), list(geometry.stride),
                list(geometry.padding), list(geometry.dilation), geometry.groups)
        if kind == "int4":
            args = (*args, group_size)
        elif kind == "w8a8":
            args = (*args, zero_point)
        _replace(ir, node, OPS[f"conv_{kind}"], args)


def _rewrite_experts(ir: IR, layer: Layer, kind: str, nodes: dict[str, Node],
                     group_size: int) -> None:
    """Replace the gather ``W[ids]`` by one that dequantizes; the batched matmul stays."""
    if kind not in ("int8", "int4"):
        raise ValueError(f"no quantized expert gather for {kind}")
    transposed = layer.perm == (0, 2, 1)
    for gather in dict.fromkeys(use.via[0] for use in layer.uses):
        ids = gather.args[1][0]
        if kind == "int8":
            args = (nodes["weight"], nodes["scale"], ids, transposed)
        else:
            args = (nodes["weight"], nodes["scale"], nodes["zero"], ids, group_size, transposed)
        _replace(ir, gather, OPS[f"expert_gather_{kind}"], args)


def _erase_dead_views(ir: IR, layer: Layer) -> None:
    """Drop the transposes / gathers that led from the old weight to the replaced ops."""
    for use in layer.uses:
        for node in reversed(use.via):
            if not getattr(node, "_erased", False) and not node.users:
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
