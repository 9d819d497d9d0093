"""Weight-bearing layers: the one recognizer every analysis and transform uses.

A *layer* is one floating-point weight tensor (a parameter, buffer or lifted constant) together
with every op that reads it as a weight. Keying by the tensor rather than by the op keeps tied
weights (an LM head sharing the token embedding) as one layer: compressing the tensor changes
both uses, and a transform must store it once.

Recognized uses (``Use.role``):

* ``linear``: ``aten.linear(x, W)`` with ``W[N, K]``;
* ``right``: ``x @ W`` as ``aten.mm`` / ``aten.matmul`` / ``aten.addmm`` (GPT-2's ``Conv1D``
  stores ``W[K, N]``), also through a transpose of the stored tensor: Falcon computes
  ``input @ weight.T`` (``aten.numpy_T`` / ``aten.t`` / ``aten.transpose`` / ``aten.permute``
  between the parameter and the matmul);
* ``conv``: ``aten.conv1d/2d/3d`` / ``aten.convolution`` with ``W[O, I/groups, *kernel]``
  (regular, depthwise, pointwise and grouped are all this one role; ``groups`` is on the op);
* ``conv_transpose``: transposed convolutions (``W[I, O/groups, *kernel]``);
* ``embedding``: ``aten.embedding(W, ids)`` with ``W[V, D]`` (rows = vocabulary);
* ``expert``: a batched 3-D expert tensor ``W[E, N, K]`` gathered per token by expert id
  (``W[ids]``, ``aten.index``) and multiplied with ``aten.bmm`` / ``aten.matmul`` — the
  mixture-of-experts layout of transformers 5 (Mixtral, Qwen-MoE, ...); ``W[E, K, N]`` when
  the gathered tensor is the right operand.

Every layer also has a *canonical* orientation, the stored tensor with its axes permuted so that
output channels come first and the reduction (input) axes last: ``[N, K]`` for the linear
roles, ``[O, I/g, *kernel]`` for convolutions, ``[V, D]`` for embeddings and ``[E, N, K]`` for
experts. Quantizers and sensitivity criteria work on the canonical tensor and map results back
with :meth:`Layer.stored`, so ``W``, ``W.T`` and a permuted ``W`` are one case, not three.

Users of a weight that are none of these (an elementwise op reading a norm scale, a weight read
by a custom op) are kept as :attr:`Layer.foreign`: a transform that rewrites the tensor must
leave such a layer alone (it would have to keep the float copy too), and say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.export.graph_signature import InputKind
from torch.fx import Node

from slimc.ir import IR

_WEIGHT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)

#: Convolutions: ATen op name -> index of the ``groups`` argument.
CONV_OPS: dict[str, int] = {"aten.conv1d": 6, "aten.conv2d": 6, "aten.conv3d": 6,
                            "aten.convolution": 8}
CONV_TRANSPOSE_OPS = {"aten.conv_transpose1d", "aten.conv_transpose2d", "aten.conv_transpose3d"}
#: Matmuls that may read a weight on the right: op name -> index of the weight argument.
RIGHT_OPS: dict[str, int] = {"aten.mm": 1, "aten.matmul": 1, "aten.addmm": 2}
#: Ops that only permute the axes of the stored weight on its way to a matmul.
PERMUTE_OPS = {"aten.t", "aten.numpy_T", "aten.transpose", "aten.permute", "aten.mT",
               "aten.swapaxes", "aten.swapdims", "aten.movedim"}


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
class Use:
    """One op reading a layer's weight."""

    #: The op (``aten.linear``, ``aten.matmul``, ``aten.conv2d``, ``aten.bmm`` ...).
    node: Node
    #: ``linear``, ``right``, ``conv``, ``conv_transpose``, ``embedding`` or ``expert``.
    role: str
    #: View ops between the weight placeholder and ``node`` (transposes, the expert gather).
    via: tuple[Node, ...] = ()
    #: Index in ``node.args`` of the activation the weight multiplies (None: embedding ids).
    input_arg: int | None = 0
    #: Axis of that activation holding the input features.
    feature_dim: int = -1
    #: Stored axes in canonical order (``canonical = stored.permute(perm)``).
    perm: tuple[int, ...] = ()


@dataclass(frozen=True)
class Layer:
    """One weight tensor and the ops that use it (see the module docstring)."""

    #: Module path of the first op using the weight (``model.layers.0.mlp.up_proj``); unique.
    name: str
    module_type: str
    #: ``linear``, ``conv``, ``conv_transpose``, ``embedding`` or ``expert`` (the first use).
    kind: str
    weight: Node
    #: State-dict key of the tensor (``model.layers.0.mlp.up_proj.weight``).
    target: str
    uses: tuple[Use, ...]
    #: Users of the weight that are not weight ops (see the module docstring).
    foreign: tuple[Node, ...] = field(default=())
    #: Stored shape.
    shape: tuple[int, ...] = ()

    # -- views used by analyses and transforms -------------------------------------------

    @property
    def ops(self) -> tuple[Node, ...]:
        return tuple(use.node for use in self.uses)

    @property
    def weight_node(self) -> Node:
        return self.weight

    @property
    def perm(self) -> tuple[int, ...]:
        return self.uses[0].perm

    @property
    def consistent(self) -> bool:
        """Every use reads the tensor in one orientation (not ``W`` here and ``W.T`` there)."""
        return all(use.perm == self.perm for use in self.uses)

    @property
    def complete(self) -> bool:
        """Every user of the weight is a recognized weight op, in one orientation: a transform
        may replace the tensor without keeping the float copy."""
        return not self.foreign and self.consistent

    @property
    def transposed(self) -> bool:
        return self.perm != tuple(range(len(self.perm)))

    @property
    def is_embedding(self) -> bool:
        return any(use.role == "embedding" for use in self.uses)

    @property
    def roles(self) -> set[str]:
        return {use.role for use in self.uses}

    @property
    def linear_nodes(self) -> list[Node]:
        """The uses that multiply an activation (all but embedding gathers)."""
        return [use.node for use in self.uses if use.role != "embedding"]

    @property
    def output_channel_axis(self) -> int:
        """Axis of the *stored* weight whose slices are output channels (embedding: the
        hidden dim; expert: the per-expert output rows)."""
        if self.kind == "embedding":
            return 1
        return self.perm[1] if self.kind in ("expert", "conv_transpose") else self.perm[0]

    def canonical(self, stored: torch.Tensor) -> torch.Tensor:
        """The stored tensor with output channels first, inputs last (a view)."""
        return stored.permute(self.perm) if self.transposed else stored

    def stored(self, canonical: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`canonical`: back to the stored axis order (contiguous)."""
        if not self.transposed:
            return canonical
        inverse = [0] * len(self.perm)
        for i, axis in enumerate(self.perm):
            inverse[axis] = i
        return canonical.permute(inverse).contiguous()

    def matrix(self, ir: IR) -> torch.Tensor:
        """The weight as a float32 matrix ``[rows, reduction]`` (a copy, never the IR's tensor):
        ``[N, K]`` for linears, ``[O, I/g * kernel]`` for convolutions, ``[V, D]`` for
        embeddings, ``[E * N, K]`` for experts (one row per output channel of each expert)."""
        w = self.canonical(ir.get_weight(self.weight).detach().float())
        if self.kind == "conv_transpose":
            w = w.movedim(1, 0)
        return w.reshape(-1, w.shape[-1]) if self.kind == "expert" else \
            w.reshape(w.shape[0], -1).clone()

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`matrix`: a ``[rows, reduction]`` matrix back in the stored shape."""
        shape = [self.shape[axis] for axis in self.perm]
        if self.kind == "conv_transpose":
            shape[0], shape[1] = shape[1], shape[0]
            return matrix.reshape(shape).movedim(0, 1).contiguous()
        return self.stored(matrix.reshape(shape))

    @property
    def canonical_output_axis(self) -> int:
        """Axis of the canonical tensor whose slices are output channels."""
        return 1 if self.kind in ("embedding", "expert", "conv_transpose") else 0

    def groups(self) -> int:
        """Convolution groups (1 for anything else)."""
        use = self.uses[0]
        index = CONV_OPS.get(op_name(use.node))
        if index is None or len(use.node.args) <= index:
            return 1
        return int(use.node.args[index])


# -- recognition ----------------------------------------------------------------------------


def _compose(perm: list[int], node: Node) -> list[int] | None:
    """``perm`` (stored axes in the current order) after the permuting view ``node``."""
    op = op_name(node)
    rank = len(perm)
    if op in ("aten.t", "aten.numpy_T"):
        return perm[::-1] if rank <= 2 or op == "aten.numpy_T" else None
    if op == "aten.mT":
        return [*perm[:-2], perm[-1], perm[-2]] if rank >= 2 else None
    if op in ("aten.transpose", "aten.swapaxes", "aten.swapdims"):
        a, b = (int(d) % rank for d in node.args[1:3])
        out = list(perm)
        out[a], out[b] = out[b], out[a]
        return out
    if op == "aten.permute":
        return [perm[int(d) % rank] for d in node.args[1]]
    if op == "aten.movedim":
        src, dst = node.args[1], node.args[2]
        if not isinstance(src, int) or not isinstance(dst, int):
            return None
        out = list(perm)
        out.insert(dst % rank, out.pop(src % rank))
        return out
    return None


def _is_expert_gather(node: Node, source: Node) -> bool:
    """``source[ids]``: ``aten.index(source, [ids])`` selecting whole experts (axis 0)."""
    if op_name(node) != "aten.index" or node.args[0] is not source:
        return False
    indices = node.args[1]
    return isinstance(indices, (list, tuple)) and len(indices) == 1 \
        and isinstance(indices[0], Node)


def _uses_through(node: Node, source: Node, perm: list[int], via: tuple[Node, ...],
                  gathered: bool) -> tuple[list[Use], list[Node]]:
    """Recognized uses of ``source`` (the weight, or a view of it) by ``node``."""
    op = op_name(node)
    if op in PERMUTE_OPS and node.args[0] is source:
        new = _compose(perm, node)
        if new is not None:
            return _walk(node, new, (*via, node), gathered)
    if not gathered and len(perm) == 3 and _is_expert_gather(node, source):
        return _walk(node, perm, (*via, node), True)
    args = node.args
    rank = len(perm)
    if gathered:  # [S, A, B] after the gather: a batched matmul against activations
        if op in ("aten.bmm", "aten.matmul") and len(args) == 2 and args[0] is not args[1]:
            if args[0] is source:  # W[S, N, K] @ x[S, K, *]
                return [Use(node, "expert", via, 1, -2, tuple(perm))], []
            if args[1] is source:  # x[S, *, K] @ W[S, K, N]
                return [Use(node, "expert", via, 0, -1, (perm[0], perm[2], perm[1]))], []
        return [], [node]
    if op == "aten.linear" and len(args) > 1 and args[1] is source and args[0] is not source \
            and rank == 2:
        return [Use(node, "linear", via, 0, -1, tuple(perm))], []
    if op in RIGHT_OPS and rank == 2 and len(args) > RIGHT_OPS[op] \
            and args[RIGHT_OPS[op]] is source and sum(a is source for a in args) == 1:
        return [Use(node, "right", via, 1 if op == "aten.addmm" else 0, -1,
                    (perm[1], perm[0]))], []
    if not via and len(args) > 1 and args[1] is source and args[0] is not source:
        if op in CONV_OPS:
            return [Use(node, "conv", via, 0, 1, tuple(perm))], []
        if op in CONV_TRANSPOSE_OPS:
            return [Use(node, "conv_transpose", via, 0, 1, tuple(perm))], []
    if op == "aten.embedding" and not via and args[0] is source and rank == 2:
        return [Use(node, "embedding", via, None, -1, tuple(perm))], []
    return [], [node]


def _walk(source: Node, perm: list[int], via: tuple[Node, ...],
          gathered: bool) -> tuple[list[Use], list[Node]]:
    uses: list[Use] = []
    foreign: list[Node] = []
    for user in source.users:
        found, other = _uses_through(user, source, perm, via, gathered)
        uses += found
        foreign += other
    return uses, foreign


def _kind(role: str) -> str:
    return "linear" if role == "right" else role


def find_layers(ir: IR, *, complete_only: bool = False,
                embeddings: bool = True) -> list[Layer]:
    """Every floating-point weight read by at least one weight op, in graph order of its first
    use. ``complete_only``: only layers a transform may rewrite (see :attr:`Layer.complete`);
    ``embeddings=False`` drops layers with an embedding use."""
    candidates = []
    for node in ir.nodes("placeholder"):
        spec = ir.placeholder_spec(node)
        if spec is None or spec.kind not in _WEIGHT_KINDS or not node.users:
            continue
        value = ir.get_weight(node)
        if not value.is_floating_point() or value.dim() < 2:
            continue
        uses, foreign = _walk(node, list(range(value.dim())), (), False)
        if not uses:
            continue
        candidates.append((node, spec.target, tuple(value.shape), uses, foreign))
    order = {node: i for i, node in enumerate(ir.graph.nodes)}
    candidates.sort(key=lambda c: min(order[u.node] for u in c[3]))
    layers = []
    used_names: set[str] = set()
    for node, target, shape, uses, foreign in candidates:
        uses.sort(key=lambda u: order[u.node])
        info = ir.node_info(uses[0].node)
        name = info.module_path or node.name
        if target.startswith(f"{name}.") and not target.endswith(".weight"):
            name = str(target)  # a module's named tensor: ``mlp.experts.gate_up_proj``
        if name in used_names:  # two weights under one module (rare): keep names unique
            name = f"{name}:{node.name}"
        used_names.add(name)
        layer = Layer(name=name, module_type=info.module_type.rsplit(".", 1)[-1],
                      kind=_kind(uses[0].role), weight=node, target=str(target),
                      uses=tuple(uses), foreign=tuple(foreign), shape=shape)
        if complete_only and not layer.complete:
            continue
        if not embeddings and layer.is_embedding:
            continue
        layers.append(layer)
    return layers


# -- convolution geometry -------------------------------------------------------------------


@dataclass(frozen=True)
class ConvGeometry:
    """A (non-transposed) convolution's hyper-parameters, padding made explicit."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    #: ``before, after`` per spatial axis (``padding='same'`` of an even kernel is uneven).
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int


def _per_axis(value, spatial: int, default: int) -> tuple[int, ...] | None:
    if value is None:
        return (default,) * spatial
    if isinstance(value, int):
        return (value,) * spatial
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return tuple(value) * spatial if len(value) == 1 else tuple(value)
    return None  # symbolic


def conv_geometry(node: Node, weight_shape: tuple[int, ...]) -> ConvGeometry | None:
    """Hyper-parameters of ``aten.conv1d/2d/3d`` (either overload) or a non-transposed
    ``aten.convolution``; None for anything else (transposed, symbolic values)."""
    op = op_name(node)
    if op not in CONV_OPS:
        return None
    spatial = len(weight_shape) - 2
    kernel = tuple(int(k) for k in weight_shape[2:])
    args = list(node.args) + [None] * 9
    if op == "aten.convolution":
        if args[6] or any(args[7] or ()):
            return None  # transposed
        stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
    else:
        stride, padding, dilation, groups = args[3], args[4], args[5], args[6]
        padding = node.kwargs.get("padding", padding)
    stride = _per_axis(stride, spatial, 1)
    dilation = _per_axis(dilation, spatial, 1)
    if stride is None or dilation is None:
        return None
    if isinstance(padding, str):
        if padding == "valid":
            pads: tuple[int, ...] = (0,) * (2 * spatial)
        elif padding == "same":
            pads = ()
            for k, d in zip(kernel, dilation, strict=True):
                total = d * (k - 1)
                pads += (total // 2, total - total // 2)
        else:
            return None
    else:
        sym = _per_axis(padding, spatial, 0)
        if sym is None:
            return None
        pads = tuple(p for v in sym for p in (v, v))
    return ConvGeometry(kernel, stride, pads, dilation, int(groups or 1))


# -- normalization --------------------------------------------------------------------------


def linearize_weight_matmuls(ir: IR) -> int:
    """Rewrite ``x @ W.T`` against a stored ``W[N, K]`` (``matmul(x, W.t())``, Falcon's
    projections; ``addmm(b, x, W.t())``) as ``aten.linear(x, W[, b])``: the same computation,
    in the form every transform and the backend know best (pruning's channel analysis, the
    packed-weight kernels). Exact; returns how many ops were rewritten."""
    aten = torch.ops.aten
    count = 0
    for layer in find_layers(ir):
        for use in layer.uses:
            node = use.node
            if use.role != "right" or use.perm != (0, 1) or not use.via \
                    or node.kwargs or getattr(node, "_erased", False):
                continue
            op = op_name(node)
            if op == "aten.addmm":
                if len(node.args) != 3:
                    continue  # beta / alpha
                args = (node.args[1], layer.weight, node.args[0])
            elif op in ("aten.mm", "aten.matmul"):
                args = (node.args[0], layer.weight)
            else:
                continue
            with ir.graph.inserting_before(node):
                new = ir.graph.call_function(aten.linear.default, args)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            for spec in ir.program.graph_signature.output_specs:
                if getattr(spec.arg, "name", None) == node.name:
                    spec.arg.name = new.name
            ir.graph.erase_node(node)
            for view in reversed(use.via):
                if not view.users:
                    ir.graph.erase_node(view)
            count += 1
    if count:
        ir.changed()
    return count
