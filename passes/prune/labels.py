"""Channel-label propagation: the dependency engine behind ``prune-groups``.

Why labels instead of per-op dimension rules: every producer of channels (linear, conv,
embedding output) gets one integer id per output channel, and a *label tensor* with the node's
exact shape is pushed through the graph. Shape ops (view/reshape/transpose/permute/expand/
split/chunk/cat/slice...) are simply *executed* on the label tensors, so head splits, GQA
``repeat_kv`` expansions, fused QKV splits and rotary half-rotations are mapped index by index
without any per-pattern code. Where two labelled tensors meet elementwise (residual add,
gated MLP ``silu(gate) * up``, rotary ``x*cos + rot(x)*sin``) their ids are united in a
union-find: united channels must be removed together. Batched matmuls of two activations and
SDPA unite everything within one batch slice (one attention head), which makes heads atomic.
Channels reaching the graph outputs or an op the engine does not understand are *pinned* (never
removed).

Grouped-query attention: an ``expand`` that repeats a labelled tensor along a new axis (HF's
``repeat_kv``: ``[b, kv, 1, s, d] -> [b, kv, n_rep, s, d]``) gives every copy a *virtual* id
(one per source channel and repeat slot, a :class:`Repeat`). When such copies reach attention
as keys/values, the query rows are not united with them: each query head stays its own unit,
the K/V heads (the virtual ids' sources) form another, and each virtual id is *tied* to the
query head that reads it. Removing query heads then shrinks the repeat axis (``n_rep``), which
needs the same number removed from every KV group of the attention; removing a KV head needs
all its query heads removed (see :func:`shapes.removed_mask`). Virtual ids that reach anything
else are *collapsed* (united with their sources): the old, atomic KV-group behaviour.

The result records, per weight tensor and axis, the channel id of every slice along that axis,
and, per graph node, the label tensor — everything :mod:`shapes` needs to rewrite constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.fx import Node

from slimc.ir import IR, hinted_shape, size_hint

NONE = -1

#: Ops executed verbatim on label tensors (their non-tensor args are shapes/dims).
SHAPE_OPS = {
    "aten.view", "aten.reshape", "aten._unsafe_view", "aten.transpose", "aten.permute",
    "aten.unsqueeze", "aten.squeeze", "aten.expand", "aten.flatten", "aten.slice",
    "aten.select", "aten.clone", "aten.contiguous", "aten.alias", "aten.detach", "aten.t",
    "aten.unflatten", "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unbind",
    "aten.cat", "aten.stack", "aten.narrow", "aten.movedim", "aten.expand_as",
    "aten.view_as", "aten.reshape_as", "aten.repeat_interleave",
}
#: Ops that pass labels through unchanged (dtype casts, eval-mode dropout).
IDENTITY_OPS = {"aten.to", "aten._to_copy", "aten.dropout", "aten.type_as",
                "aten.lift_fresh_copy", "aten.feature_dropout"}
POINTWISE_OPS = {
    "aten.add", "aten.sub", "aten.mul", "aten.div", "aten.where", "aten.maximum",
    "aten.minimum", "aten.pow", "aten.gelu", "aten.silu", "aten.relu", "aten.relu6",
    "aten.hardtanh", "aten.hardswish", "aten.hardsigmoid", "aten.sigmoid", "aten.tanh",
    "aten.neg", "aten.exp", "aten.log", "aten.rsqrt", "aten.sqrt", "aten.abs", "aten.erf",
    "aten.clamp", "aten.clamp_min", "aten.clamp_max", "aten.softplus", "aten.mish",
    "aten.leaky_relu", "aten.elu", "aten.masked_fill", "aten.reciprocal", "aten.square",
    "aten.rsub", "aten.cos", "aten.sin", "aten.gelu_", "aten.relu_", "aten.silu_",
}
REDUCE_OPS = {"aten.mean", "aten.sum", "aten.amax", "aten.amin", "aten.var", "aten.std",
              "aten.max", "aten.min"}
SOFTMAX_OPS = {"aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax"}
POOL_OPS = {"aten.adaptive_avg_pool2d", "aten.adaptive_avg_pool1d", "aten.avg_pool2d",
            "aten.max_pool2d", "aten.avg_pool1d", "aten.max_pool1d", "aten._adaptive_avg_pool2d",
            "aten.max_pool2d_with_indices"}
#: Ops that only change non-channel (spatial/sequence) extents: padding, resizing.
SPATIAL_OPS = {"aten.constant_pad_nd", "aten.pad", "aten.reflection_pad2d",
               "aten.replication_pad2d", "aten.upsample_nearest2d", "aten.upsample_bilinear2d",
               "aten.reflection_pad1d", "aten.replication_pad1d"}
CONV_OPS = {"aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution"}
IGNORED_OPS = {"aten._assert_tensor_metadata", "aten._assert_scalar", "aten.sym_size",
               "aten.sym_constrain_range_for_size"}


def op_name(node: Node) -> str:
    """``aten.linear.default`` -> ``aten.linear`` (``getitem`` for ``operator.getitem``)."""
    text = str(node.target)
    if text.startswith("aten."):
        return text.rsplit(".", 1)[0] if text.count(".") >= 2 else text
    return getattr(node.target, "__name__", text)


class UnionFind:
    """Union-find over channel ids, grown as producers allocate ids."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def allocate(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Unite ``a[i]`` with ``b[i]`` wherever both are labelled and differ."""
        a, b = a.reshape(-1), b.reshape(-1)
        keep = (a >= 0) & (b >= 0) & (a != b)
        if not bool(keep.any()):
            return
        a, b = a[keep], b[keep]
        span = int(torch.maximum(a.max(), b.max())) + 1
        keys = torch.unique(a * span + b)  # 1-D unique of packed pairs: far cheaper than dim=0
        for key in keys.tolist():
            self.union(key // span, key % span)

    def union_rows(self, rows: torch.Tensor) -> None:
        """Unite all labelled ids within each row of a 2-D tensor."""
        rows = torch.unique(rows.reshape(rows.shape[0], -1), dim=0)
        for row in rows:
            ids = torch.unique(row[row >= 0]).tolist()  # a head's ids repeat along the sequence
            for other in ids[1:]:
                self.union(ids[0], other)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


@dataclass
class Producer:
    """A node whose output channels got fresh ids (``offset .. offset+size-1``)."""

    node: str
    op: str
    module_path: str
    offset: int
    size: int


@dataclass
class Repeat:
    """A labelled tensor repeated along a new axis by an ``expand`` (GQA's ``repeat_kv``).

    Copy ``r`` of source channel ``source[l]`` has the virtual id ``offset + l * n + r``;
    ``ties[l, r]`` is the query-head channel that reads that copy in attention (-1: none)."""

    node: str
    offset: int
    source: torch.Tensor
    n: int
    ties: torch.Tensor
    #: United with its sources (reached an op other than attention): no longer virtual.
    collapsed: bool = False

    @property
    def virtual(self) -> torch.Tensor:
        """Virtual ids, ``[len(source), n]``."""
        return torch.arange(self.offset, self.offset + self.source.numel() * self.n).reshape(
            -1, self.n)

    def contains(self, t: torch.Tensor) -> torch.Tensor:
        return (t >= self.offset) & (t < self.offset + self.source.numel() * self.n)


@dataclass
class Propagation:
    """What label propagation found; see the module docstring."""

    uf: UnionFind
    labels: dict[str, torch.Tensor | tuple]
    producers: list[Producer]
    #: (weight placeholder name, axis) -> channel id per index along that axis (-1: none).
    members: dict[tuple[str, int], torch.Tensor]
    pinned: set[int] = field(default_factory=set)
    #: ids whose channels feed a reduction over channels (norm statistics).
    stat_coupled: set[int] = field(default_factory=set)
    #: ids that meet another producer's ids elementwise (residual streams).
    merged: set[int] = field(default_factory=set)
    #: ids that go through SDPA / activation-activation matmuls (attention heads).
    attention: set[int] = field(default_factory=set)
    #: ids of channels that feed a depthwise conv or a BatchNorm.
    conv: set[int] = field(default_factory=set)
    #: nodes whose arguments hold shape constants the pruning pass must rewrite.
    rewrites: set[str] = field(default_factory=set)
    #: repeat-axis expands (GQA); see :class:`Repeat`.
    repeats: list[Repeat] = field(default_factory=list)
    #: ids of query heads kept apart from the K/V heads they share (GQA).
    queries: set[int] = field(default_factory=set)


def _shape(node: Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return hinted_shape(val) if isinstance(val, torch.Tensor) else None


def _ids(t: torch.Tensor) -> set[int]:
    """Distinct labelled ids of ``t`` (a scatter into a bitmap: sorting big label tensors
    dominated the analysis of real models)."""
    flat = t.reshape(-1)
    flat = flat[flat >= 0]
    if not flat.numel():
        return set()
    seen = torch.zeros(int(flat.max()) + 1, dtype=torch.bool)
    seen[flat] = True
    return set(seen.nonzero().reshape(-1).tolist())


class LabelPropagator:
    """Runs the propagation over one IR (see :func:`propagate`)."""

    def __init__(self, ir: IR, pin_outputs: bool = True) -> None:
        self.ir = ir
        self.pin_outputs = pin_outputs
        self.weights = {n.name for n in ir.nodes("placeholder")
                        if (s := ir.placeholder_spec(n)) is not None
                        and s.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR")}
        self.result = Propagation(UnionFind(), {}, [], {})
        #: node name -> indices of the (not collapsed) repeats its labels hold virtual ids of.
        self.virtual: dict[str, set[int]] = {}

    # -- helpers ------------------------------------------------------------------------------

    def lab(self, x) -> torch.Tensor | None:
        return self.result.labels.get(x.name) if isinstance(x, Node) else None

    def filled(self, x) -> torch.Tensor:
        """Label tensor of ``x``, or an all-NONE one of its shape."""
        got = self.lab(x)
        if got is not None:
            return got
        return torch.full(_shape(x), NONE, dtype=torch.int64)

    def pin(self, t: torch.Tensor | tuple | None) -> None:
        if isinstance(t, tuple):
            for item in t:
                self.pin(item)
        elif t is not None:
            self.result.pinned |= _ids(t)

    def is_weight(self, x) -> bool:
        return isinstance(x, Node) and x.name in self.weights

    def member(self, weight: Node, axis: int, ids: torch.Tensor) -> None:
        """Record that slice ``i`` of ``weight`` along ``axis`` belongs to channel ``ids[i]``."""
        ids = ids.reshape(-1).clone()
        if not bool((ids >= 0).any()):
            return
        key = (weight.name, axis)
        old = self.result.members.get(key)
        if old is None:
            self.result.members[key] = ids
            return
        self.result.uf.union_pairs(old, ids)  # tied weights: both uses are one channel
        self.result.members[key] = torch.where(old >= 0, old, ids)

    def produce(self, node: Node, dim: int, n: int) -> torch.Tensor:
        """Fresh ids for the ``n`` channels along ``dim`` of ``node``'s output."""
        shape = _shape(node)
        offset = self.result.uf.allocate(n)
        info = self.ir.node_info(node)
        self.result.producers.append(Producer(node.name, op_name(node), info.module_path,
                                              offset, n))
        view = [1] * len(shape)
        view[dim] = n
        ids = (torch.arange(n) + offset).reshape(view).expand(shape)
        self.result.labels[node.name] = ids
        return ids[(0,) * dim + (slice(None),) + (0,) * (len(shape) - dim - 1)]

    # -- driver -------------------------------------------------------------------------------

    def run(self) -> Propagation:
        for node in self.ir.nodes():
            if node.op == "output":
                self._collapse(self._virtual_of(node.all_input_nodes))
                if self.pin_outputs:
                    for arg in node.all_input_nodes:
                        self.pin(self.result.labels.get(arg.name))
            elif node.op == "call_function":
                self.visit(node)
        self._unite_kv_heads()
        return self.result

    # -- grouped-query attention (virtual ids of repeated K/V) -------------------------------

    def _virtual_of(self, nodes) -> set[int]:
        found: set[int] = set()
        for arg in nodes:
            found |= self.virtual.get(arg.name, set())
        return {t for t in found if not self.result.repeats[t].collapsed}

    def _collapse(self, tables: set[int]) -> None:
        """Unite the copies of these repeats with their sources (and with the query heads
        already tied to them): the repeat axis is no longer prunable on its own."""
        uf = self.result.uf
        for t in sorted(tables):
            rep = self.result.repeats[t]
            if rep.collapsed:
                continue
            rep.collapsed = True
            for src, virt, ties in zip(rep.source.tolist(), rep.virtual.tolist(),
                                       rep.ties.tolist(), strict=True):
                for v, q in zip(virt, ties, strict=True):
                    uf.union(src, v)
                    if q >= 0:
                        uf.union(src, q)

    def _unite_kv_heads(self) -> None:
        """Sources read by one query head are one KV unit (eager attention meets K and V in
        two matmuls, so they are only linked through the query heads reading both)."""
        uf = self.result.uf
        anchor: dict[int, int] = {}
        for rep in self.result.repeats:
            if rep.collapsed:
                continue
            for src, ties in zip(rep.source.tolist(), rep.ties.tolist(), strict=True):
                for q in ties:
                    if q >= 0:
                        uf.union(anchor.setdefault(uf.find(q), src), src)

    def _expand(self, node: Node) -> None:
        """A repeat along one new axis (size 1 -> n) of a labelled tensor: virtual ids."""
        x = self.lab(node.args[0])
        shape = _shape(node)
        if x is None or shape is None or x.dim() != len(shape) \
                or self._virtual_of([node.args[0]]) or not bool((x >= 0).any()):
            return self._shape_op(node)
        axes = [d for d in range(1, x.dim()) if x.shape[d] == 1 and shape[d] > 1]
        if len(axes) != 1:
            return self._shape_op(node)
        axis, n = axes[0], shape[axes[0]]
        source = torch.tensor(sorted(_ids(x)), dtype=torch.int64)
        lookup = torch.full((int(source.max()) + 1,), NONE, dtype=torch.int64)
        lookup[source] = torch.arange(len(source))
        offset = self.result.uf.allocate(len(source) * n)
        out = x.expand(shape)
        view = [1] * len(shape)
        view[axis] = n
        slot = torch.arange(n).reshape(view)
        virt = torch.where(out >= 0, offset + lookup[out.clamp(min=0)] * n + slot, NONE)
        self.result.repeats.append(Repeat(node.name, offset, source, n,
                                          torch.full((len(source), n), NONE, dtype=torch.int64)))
        self.result.labels[node.name] = virt
        self.result.rewrites.add(node.name)
        self.virtual[node.name] = {len(self.result.repeats) - 1}

    def _split_attention(self, rows: list[torch.Tensor], tables: list[set[int]],
                         batch: tuple[int, ...]) -> torch.Tensor | None:
        """GQA: the first operand's rows (query heads) stay apart from the others' rows when
        those are only copies of repeated K/V heads. Returns the query id of each row, or
        None when the operands do not have that form."""
        first, rest = rows[0], torch.cat(rows[1:], 1)
        others = set().union(*tables[1:])
        if tables[0] or not others or not bool((first >= 0).any()):
            return None
        src = torch.full_like(rest, NONE)
        covered = torch.zeros_like(rest, dtype=torch.bool)
        reps = [self.result.repeats[t] for t in sorted(others)]
        for rep in reps:
            inside = rep.contains(rest)
            src[inside] = rep.source[(rest[inside] - rep.offset) // rep.n]
            covered |= inside
        if bool(((rest >= 0) & ~covered).any()):
            return None
        # Query heads must come in contiguous blocks per KV head (repeat_kv's order), so that
        # dropping the same number per block keeps queries and K/V copies aligned.
        key = src.masked_fill(src < 0, torch.iinfo(torch.int64).max).amin(1)
        per = key.reshape(-1, batch[-1] if batch else 1)
        if bool((per[:, 1:] < per[:, :-1]).any()):
            return None
        query = first.max(1).values
        uf = self.result.uf
        uf.union_rows(first)
        uf.union_rows(src)
        queries = query[:, None].expand_as(rest)
        for rep in reps:
            inside = rep.contains(rest) & (queries >= 0)
            if not bool(inside.any()):
                continue
            virt, q = rest[inside], queries[inside]
            span = int(max(int(virt.max()), int(q.max()))) + 1
            for pair in torch.unique(virt * span + q).tolist():
                v, qid = divmod(pair, span)
                row, slot = divmod(v - rep.offset, rep.n)
                old = int(rep.ties[row, slot])
                if old >= 0 and old != qid:
                    uf.union(old, qid)
                else:
                    rep.ties[row, slot] = qid
        self.result.queries |= _ids(first)
        self.result.attention |= _ids(first) | _ids(src)
        return query

    def visit(self, node: Node) -> None:
        op = op_name(node)
        inputs = [a for a in node.all_input_nodes if a.name in self.result.labels]
        producer = op in ("aten.linear", "aten.addmm", "aten.embedding") or op in CONV_OPS \
            or (op in ("aten.mm", "aten.matmul") and self.is_weight(node.args[1]))
        if not inputs and not producer:
            return
        if op in IGNORED_OPS:
            return
        tables = self._virtual_of(node.all_input_nodes)
        if tables:
            attention = op in ("aten.scaled_dot_product_attention", "aten.bmm") or (
                op in ("aten.mm", "aten.matmul") and not self.is_weight(node.args[1]))
            if op in SHAPE_OPS or op in IDENTITY_OPS or op == "getitem":
                self.virtual[node.name] = tables
            elif not attention:
                self._collapse(tables)
        if op == "getitem":
            src = self.result.labels.get(node.args[0].name)
            if isinstance(src, tuple):
                self.result.labels[node.name] = src[node.args[1]]
            return
        handler = getattr(self, "_" + op.removeprefix("aten.").lstrip("_"), None)
        if producer or handler is not None:
            (handler or self._unknown)(node)
        elif op in SHAPE_OPS:
            self._shape_op(node)
        elif op in IDENTITY_OPS:
            self.result.labels[node.name] = self.filled(node.args[0])
        elif op in POINTWISE_OPS:
            self._pointwise(node)
        elif op in REDUCE_OPS:
            self._reduce(node)
        elif op in SOFTMAX_OPS:
            self._softmax(node)
        elif op in POOL_OPS:
            self._pool(node)
        elif op in SPATIAL_OPS:
            self._spatial(node)
        else:
            self._unknown(node)

    # -- generic categories -------------------------------------------------------------------

    def _unknown(self, node: Node) -> None:
        for arg in node.all_input_nodes:
            self.pin(self.result.labels.get(arg.name))

    def shape_arg(self, x) -> torch.Tensor | int:
        """An argument of a shape op for replaying it on labels: a size computed in the graph
        (``sym_size`` of a dynamic sequence, a SymInt) at its example size, else the labels."""
        val = x.meta.get("val") if isinstance(x, Node) else None
        if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
            return size_hint(val)
        return self.filled(x)

    def _shape_op(self, node: Node) -> None:
        args = torch.fx.node.map_arg(node.args, self.shape_arg)
        kwargs = torch.fx.node.map_arg(node.kwargs, self.shape_arg)
        target = node.target
        if op_name(node) in ("aten.view", "aten._unsafe_view"):
            # The label tensors are replayed, not the model's: a transpose of labels is a
            # strided view where the model's tensor was made contiguous by an op in between
            # (MobileViT's unfold: transpose, a pointwise op, then view), so `view` may refuse
            # what the model did. `reshape` gives the same row-major result either way.
            target = torch.ops.aten.reshape.default
        out = target(*args, **kwargs)
        self.result.labels[node.name] = tuple(out) if isinstance(out, (list, tuple)) else out
        self.result.rewrites.add(node.name)

    def _pointwise(self, node: Node) -> None:
        shape = _shape(node)
        if shape is None:
            return self._unknown(node)
        out = torch.full(shape, NONE, dtype=torch.int64)
        fixed: list[Node] = []
        params: list[Node] = []
        labelled = 0
        for arg in node.all_input_nodes:
            got = self.lab(arg)
            if got is not None:
                b = got.broadcast_to(shape)
                if labelled:
                    self.result.uf.union_pairs(out, b)
                    both = (out >= 0) & (b >= 0)
                    self.result.merged |= _ids(out[both]) | _ids(b[both])
                out = torch.where(out >= 0, out, b)
                labelled += 1
            elif self.is_weight(arg):
                params.append(arg)
            elif _shape(arg):
                fixed.append(arg)
        for arg in fixed + params:
            ashape = (1,) * (len(shape) - len(_shape(arg))) + _shape(arg)
            off = len(shape) - len(_shape(arg))
            for d, size in enumerate(ashape):
                if size <= 1 or not self._varies(out, d):
                    continue
                if arg in params:
                    index = [0] * len(shape)
                    index[d] = slice(None)
                    self.member(arg, d - off, out[tuple(index)])
                else:  # a computed tensor along a channel dim: keep each line whole
                    self.result.uf.union_rows(out.movedim(d, -1).reshape(-1, shape[d]))
        self.result.labels[node.name] = out

    @staticmethod
    def _varies(t: torch.Tensor, d: int) -> bool:
        return t.shape[d] > 1 and bool((t != t.narrow(d, 0, 1)).any())

    def _reduce(self, node: Node) -> None:
        x = self.filled(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims is None or not isinstance(dims, (list, tuple, int)):
            dims = list(range(x.dim()))
        dims = [d % x.dim() for d in ([dims] if isinstance(dims, int) else dims)]
        index = [0 if d in dims else slice(None) for d in range(x.dim())]
        out = x[tuple(index)]
        if any(self._varies(x, d) for d in dims):  # a statistic over channels: no channel
            self.result.stat_coupled |= _ids(x)
            out = torch.full_like(out, NONE)
        if keep:
            for d in sorted(dims):
                out = out.unsqueeze(d)
        shape = _shape(node)
        if shape is None or tuple(out.shape) != shape:
            return self._unknown(node)
        self.result.labels[node.name] = out

    def _softmax(self, node: Node) -> None:
        x = self.filled(node.args[0])
        dim = node.args[1] % x.dim()
        if self._varies(x, dim):
            self.result.uf.union_rows(x.movedim(dim, -1).reshape(-1, x.shape[dim]))
        self.result.labels[node.name] = x

    def _pool(self, node: Node) -> None:
        x = self.filled(node.args[0])
        shape = _shape(node)
        if shape is None:  # with_indices returns a tuple
            val = node.meta["val"]
            shapes = [hinted_shape(v) for v in val]
            lab = x[:, :, :1, :1] if x.dim() == 4 else x[..., :1]
            self.result.labels[node.name] = tuple(lab.expand(s) for s in shapes)
            return
        spatial = x.dim() - 2
        lab = x[(slice(None), slice(None)) + (slice(0, 1),) * spatial]
        self.result.labels[node.name] = lab.expand(shape)

    def _spatial(self, node: Node) -> None:
        """Padding/resizing: fine when labels are constant along every dim whose size changes."""
        x = self.filled(node.args[0])
        shape = _shape(node)
        if shape is None or len(shape) != x.dim():
            return self._unknown(node)
        index = []
        for d, (a, b) in enumerate(zip(x.shape, shape, strict=True)):
            if a != b and self._varies(x, d):
                return self._unknown(node)
            index.append(slice(0, 1) if a != b else slice(None))
        self.result.labels[node.name] = x[tuple(index)].expand(shape)

    # -- layers -------------------------------------------------------------------------------

    def _consume(self, weight: Node, axis: int, x: torch.Tensor, dim: int) -> None:
        """``weight`` reads channels of ``x`` along ``dim`` through its ``axis``."""
        moved = x.movedim(dim, -1).reshape(-1, x.shape[dim])
        first = moved[0]
        if bool((moved != first).any()):  # labels vary along a batch dim: not a plain input
            self.pin(x)
            return
        self.member(weight, axis, first)

    def _linear(self, node: Node) -> None:
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        if not self.is_weight(weight):
            return self._unknown(node)
        if self.lab(x) is not None:
            self._consume(weight, 1, self.lab(x), -1)
        ids = self.produce(node, len(_shape(node)) - 1, _shape(node)[-1])
        self.member(weight, 0, ids)
        if self.is_weight(bias):
            self.member(bias, 0, ids)

    def _addmm(self, node: Node) -> None:
        bias, x, weight = node.args[:3]
        if not self.is_weight(weight):
            return self._unknown(node)
        if self.lab(x) is not None:
            self._consume(weight, 0, self.lab(x), -1)
        ids = self.produce(node, 1, _shape(node)[1])
        self.member(weight, 1, ids)
        if self.is_weight(bias):
            self.member(bias, bias.meta["val"].dim() - 1, ids)

    def _mm(self, node: Node) -> None:
        x, weight = node.args[:2]
        if not self.is_weight(weight):
            return self._batched(node, list(node.all_input_nodes))
        if self.lab(x) is not None:
            self._consume(weight, 0, self.lab(x), -1)
        self.member(weight, 1, self.produce(node, len(_shape(node)) - 1, _shape(node)[-1]))

    _matmul = _mm

    def _bmm(self, node: Node) -> None:
        self._batched(node, list(node.all_input_nodes))

    def _scaled_dot_product_attention(self, node: Node) -> None:
        q, k, v = node.args[:3]
        for extra in node.all_input_nodes:
            if extra not in (q, k, v):
                self.pin(self.lab(extra))
        self._batched(node, [q, k, v])

    def _batched(self, node: Node, operands: list[Node]) -> None:
        """Attention-like op: everything in one batch slice (a head) is one unit; under GQA
        the query head apart from the K/V head it shares (:meth:`_split_attention`)."""
        shape = _shape(node)
        tables = [self._virtual_of([x]) for x in operands]
        if shape is None:
            self._collapse(set().union(*tables))
            return self._unknown(node)
        batch = shape[:-2]
        rows = []
        for x in operands:
            t = self.filled(x)
            t = t.broadcast_to(batch + tuple(t.shape[-2:])).reshape(-1, t.shape[-2] * t.shape[-1])
            rows.append(t)
        query = self._split_attention(rows, tables, batch)
        if query is not None:
            self.result.labels[node.name] = query.reshape(batch + (1, 1)).expand(shape)
            return
        self._collapse(set().union(*tables))
        joined = torch.cat(rows, 1)
        self.result.uf.union_rows(joined)
        self.result.attention |= _ids(joined)
        rep = joined.max(1).values.reshape(batch + (1, 1))
        self.result.labels[node.name] = rep.expand(shape)

    def _embedding(self, node: Node) -> None:
        weight = node.args[0]
        if not self.is_weight(weight):
            return self._unknown(node)
        shape = _shape(node)
        self.member(weight, 1, self.produce(node, len(shape) - 1, shape[-1]))

    def _conv(self, node: Node) -> None:
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        op = op_name(node)
        groups = node.args[8] if op == "aten.convolution" else (
            node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1))
        if op == "aten.convolution" and node.args[6]:
            return self._unknown(node)  # transposed
        if not self.is_weight(weight):
            return self._unknown(node)
        cin = _shape(x)[1]
        cout = _shape(node)[1]
        lab = self.lab(x)
        if groups == 1:
            if lab is not None:
                self._consume(weight, 1, lab, 1)
            ids = self.produce(node, 1, cout)
        elif groups == cin == cout:  # depthwise: channels pass straight through
            if lab is None:
                ids = self.produce(node, 1, cout)
            else:
                ids = lab[(0, slice(None)) + (0,) * (lab.dim() - 2)]
                spatial = _shape(node)[2:]
                self.result.labels[node.name] = ids.reshape(
                    (1, cout) + (1,) * len(spatial)).expand(_shape(node))
                self.result.conv |= _ids(ids)
                self.result.rewrites.add(node.name)
        else:  # grouped conv: keep its channels
            self.pin(lab)
            ids = self.produce(node, 1, cout)
            self.pin(ids)
        self.member(weight, 0, ids)
        if self.is_weight(bias):
            self.member(bias, 0, ids)

    _conv1d = _conv2d = _conv3d = _convolution = _conv

    def _norm_params(self, x: torch.Tensor, params: list, dims: int) -> torch.Tensor:
        for p in params:
            if self.is_weight(p):
                lead = [0] * (x.dim() - dims)
                vec = x[tuple(lead)]
                while vec.dim() > 1:  # multi-dim normalized_shape: keep it whole
                    vec = vec[0]
                self.member(p, 0, vec)
        return x

    def _layer_norm(self, node: Node) -> None:
        x = self.filled(node.args[0])
        shape = node.args[1]
        if len(shape) != 1:
            return self._unknown(node)
        if self._varies(x, x.dim() - 1):
            self.result.stat_coupled |= _ids(x)
        self._norm_params(x, list(node.args[2:4]), 1)
        out = x
        if op_name(node) == "aten.native_layer_norm":
            stat_shape = tuple(node.meta["val"][1].shape)
            stat = torch.full(stat_shape, NONE, dtype=torch.int64)
            out = (x, stat, stat)
        self.result.labels[node.name] = out
        self.result.rewrites.add(node.name)

    _native_layer_norm = _layer_norm

    def _batch_norm(self, node: Node) -> None:
        x = self.filled(node.args[0])
        ids = x[(0, slice(None)) + (0,) * (x.dim() - 2)]
        for p in node.args[1:5]:
            if self.is_weight(p):
                self.member(p, 0, ids)
        self.result.conv |= _ids(ids)
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            extra = tuple(torch.full(hinted_shape(v), NONE, dtype=torch.int64) for v in val[1:])
            self.result.labels[node.name] = (x,) + extra
        else:
            self.result.labels[node.name] = x

    _native_batch_norm_legit_no_training = _batch_norm

    def _group_norm(self, node: Node) -> None:
        self._unknown(node)


def propagate(ir: IR, pin_outputs: bool = True) -> Propagation:
    """Push channel labels through ``ir`` and return the coupling they revealed. With
    ``pin_outputs=False`` the channels of graph outputs may be removed too (the output gets
    narrower: an embedding model's vector dimension, for instance). Single-threaded: its many
    small integer ops cost 20-50x the CPU on torch's multi-thread pool (see
    :func:`slimc.jobs.single_threaded`)."""
    from slimc.jobs import single_threaded

    with torch.no_grad(), single_threaded():
        return LabelPropagator(ir, pin_outputs).run()
