"""``rotate``: rotate a pre-norm transformer's residual stream by an orthogonal matrix.

``rotate{kind=hadamard, seed=0}``

Computational invariance (SliceGPT, QuaRot, SpinQuant): an RMSNorm without weight commutes
with any orthogonal ``Q`` (``rms(h Q) = rms(h)``). So with every RMSNorm's weight folded into
the linears that read its output, multiplying the residual stream by ``Q`` -- the token
embedding ``E -> E Q``, every linear that reads a norm ``W -> W Q``, every linear that adds
into the stream ``W -> Q^T W`` (bias ``b -> b Q``) -- leaves the model's outputs unchanged (the
pass is ``exact``: the pass manager checks it). What changes is what a later ``quantize`` sees:
the few input channels that carry outliers are spread over all of them, so group-wise int3 /
int4 grids lose less. Run it before ``quantize`` (after it, the linears are quantized ops and
the pass leaves the model alone). No run-time cost, with one exception:

* A **tied** output head (the same tensor as the embedding) behind a final norm with a
  weight ``g`` cannot absorb ``g``: the embedding needs ``E Q``, the head ``E diag(g) Q``. The
  table stays tied and one ``H x H`` linear ``mix = Q^T diag(g) Q`` is inserted in front of the
  head (``H^2`` more weights, quantized like any linear by a later ``quantize``, and counted
  in the artifact's bytes). An untied head absorbs ``g`` like any reader.

The residual stream is found structurally from the token embedding: nodes reached through adds
of linear outputs (the writers), dtype casts, aliases and scalar multiplies; each RMSNorm of it
(``x * rsqrt(mean(x^2, -1) + eps)``, times an optional weight) must feed only linears. Anything
else that reads the stream (a LayerNorm, which subtracts a mean and does not commute with
``Q``; an output; a weight shared elsewhere) leaves the model unrotated, with the reason in
``ir.annotations["rotate"]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from slimc.passes.rotate.orthogonal import rotation
from torch.fx import Node

from slimc.ir import IR, _storage_key
from slimc.passmanager import PassContext, PassOptions, PreservedAnalyses, TransformPass

aten = torch.ops.aten
LINEAR = aten.linear.default
#: ops that keep each position's hidden vector intact (the last dimension untouched)
_ROWWISE = {aten.alias.default, aten.clone.default, aten.to.dtype, aten.detach.default}
_IGNORED = {aten._assert_tensor_metadata.default}


class RotateOptions(PassOptions):
    kind: Literal["hadamard", "random"] = Field(
        "hadamard", description="The orthogonal matrix: 'hadamard' (random signs times a "
        "Walsh-Hadamard of the largest power-of-two factor of the hidden size, Kronecker a "
        "random orthogonal of the rest) or 'random' (Haar-random orthogonal).")
    seed: int = Field(0, ge=0, description="Seed of the random signs / orthogonal factor.")


class NotRotatable(Exception):
    """The graph's residual stream is read by something rotation would change."""


@dataclass
class Norm:
    """One RMSNorm of the stream: its normalized output ``out`` (after the weight ``mul``
    if any), the weight node ``weight`` and the linears reading ``out``."""

    out: Node
    weight_mul: Node | None
    weight: Node | None
    readers: list[Node] = field(default_factory=list)


@dataclass
class Plan:
    embedding: Node
    table: Node
    hidden: int
    #: placeholders holding the table's tensor (a tied head is often a second placeholder)
    tables: set[Node] = field(default_factory=set)
    writers: list[Node] = field(default_factory=list)
    norms: list[Norm] = field(default_factory=list)


class Rotate(TransformPass):
    """Rotate the residual stream of a pre-RMSNorm transformer (outputs unchanged) so that
    later low-bit quantization sees no outlier channels."""

    name = "rotate"
    Options = RotateOptions
    exact = True

    def run(self, ir: IR, ctx: PassContext, options: PassOptions) -> PreservedAnalyses:
        assert isinstance(options, RotateOptions)
        summary = rotate_ir(ir, options.kind, options.seed)
        ir.annotations[self.name] = summary
        if summary["rotated"]:
            ctx.log(f"rotate: residual stream ({summary['hidden']}) rotated ({options.kind}); "
                    f"{summary['readers']} readers, {summary['writers']} writers, "
                    f"{summary['norms_folded']} norms folded"
                    + (", a mix linear in front of the tied head" if summary["mix"] else ""))
            return PreservedAnalyses.none()
        ctx.log(f"rotate: not rotated: {summary['reason']}")
        return PreservedAnalyses.all()


def _is_weight(ir: IR, node) -> bool:
    if not isinstance(node, Node) or node.op != "placeholder":
        return False
    try:
        ir.get_weight(node)
    except KeyError:
        return False
    return True


def _users(node: Node) -> list[Node]:
    return [u for u in node.users if u.target not in _IGNORED]


def _rowwise(node: Node, hidden: int) -> bool:
    """``node`` passes its first argument's hidden vectors through unchanged."""
    if node.op != "call_function":
        return False
    if node.target in _ROWWISE:
        return True
    if node.target is aten.dropout.default:  # in eval mode (train=False) an identity
        return len(node.args) > 2 and node.args[2] is False
    if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        src, out = node.args[0].meta.get("val"), node.meta.get("val")
        return src is not None and out is not None and src.shape[-1] == hidden == out.shape[-1]
    if node.target is aten.slice.Tensor:
        val = node.args[0].meta.get("val")
        dim = node.args[1] if len(node.args) > 1 else 0
        return val is not None and dim % val.dim() != val.dim() - 1
    return False


def _rms_norm(r: Node, pow_node: Node, hidden: int) -> Node:
    """The ``r * rsqrt(mean(r^2, -1) + eps)`` node whose square is ``pow_node``."""
    if pow_node.args[1] != 2:
        raise NotRotatable(f"{pow_node.name} raises the stream to a power other than 2")
    chain = _users(pow_node)
    if len(chain) != 1 or chain[0].target is not aten.mean.dim:
        raise NotRotatable(f"{pow_node.name}: the square is not averaged (not an RMSNorm)")
    mean = chain[0]
    dims = [d % r.meta["val"].dim() for d in mean.args[1]]
    if dims != [r.meta["val"].dim() - 1]:
        raise NotRotatable(f"{mean.name} averages over other than the hidden dimension")
    node = mean
    while True:
        nxt = _users(node)
        if len(nxt) != 1:
            raise NotRotatable(f"{node.name}: an RMSNorm statistic with several readers")
        node = nxt[0]
        if node.target is aten.rsqrt.default:
            break
        if node.target is not aten.add.Tensor or isinstance(node.args[1], Node):
            raise NotRotatable(f"{node.name}: not an RMSNorm (rsqrt(mean + eps) expected)")
    muls = _users(node)
    if len(muls) != 1 or muls[0].target is not aten.mul.Tensor or r not in muls[0].args:
        raise NotRotatable(f"{node.name}: the RMSNorm scale does not multiply the stream")
    return muls[0]


def _norm_output(ir: IR, normalized: Node, hidden: int) -> Norm:
    """Follow an RMSNorm's output through casts to its optional weight and its linears."""
    node = normalized
    weight_mul = weight = None
    while True:
        users = _users(node)
        if len(users) == 1 and _rowwise(users[0], hidden):
            node = users[0]
            continue
        if len(users) == 1 and users[0].target is aten.mul.Tensor and weight_mul is None:
            mul = users[0]
            other = mul.args[1] if mul.args[0] is node else mul.args[0]
            if _is_weight(ir, other) and tuple(ir.get_weight(other).shape) == (hidden,):
                weight_mul, weight, node = mul, other, mul
                continue
        break
    norm = Norm(node, weight_mul, weight)
    frontier = [node]
    while frontier:
        x = frontier.pop()
        if x.op == "output":
            raise NotRotatable(f"{normalized.name}: a normalized hidden state is an output")
        for u in _users(x):
            if u.op == "output":
                raise NotRotatable(f"{x.name}: a normalized hidden state is an output")
            if _rowwise(u, hidden):
                frontier.append(u)
            elif u.target is LINEAR and u.args[0] is x and _is_weight(ir, u.args[1]):
                norm.readers.append(u)
            else:
                raise NotRotatable(f"{u.name} ({u.target}) reads a normalized hidden state; "
                                   "only linears can absorb the rotation")
    return norm


def _writer(ir: IR, node: Node, hidden: int) -> Node:
    """The linear producing ``node`` (what an add puts into the stream)."""
    while isinstance(node, Node) and _rowwise(node, hidden) and len(_users(node)) == 1:
        node = node.args[0]
    if not isinstance(node, Node) or node.target is not LINEAR or len(_users(node)) != 1 \
            or not _is_weight(ir, node.args[1]):
        raise NotRotatable(f"{getattr(node, 'name', node)} is added to the residual stream "
                           "but is not a linear's output read only there")
    bias = node.args[2] if len(node.args) > 2 else None
    if bias is not None and not _is_weight(ir, bias):
        raise NotRotatable(f"{node.name}: its bias is not a weight")
    return node


def plan_rotation(ir: IR) -> Plan:
    """The embedding, writers and norms of the residual stream, or ``NotRotatable``."""
    embeds = [n for n in ir.nodes("call_function") if n.target is aten.embedding.default
              and _is_weight(ir, n.args[0]) and ir.get_weight(n.args[0]).dim() == 2]
    if len(embeds) != 1:
        raise NotRotatable(f"{len(embeds)} token embeddings (one expected)")
    emb = embeds[0]
    hidden = int(ir.get_weight(emb.args[0]).shape[1])
    plan = Plan(emb, emb.args[0], hidden)
    key = _storage_key(ir.get_weight(plan.table))
    plan.tables = {n for n in ir.nodes("placeholder")
                   if _is_weight(ir, n) and _storage_key(ir.get_weight(n)) == key}
    seen: set[Node] = set()
    frontier = [emb]
    while frontier:
        r = frontier.pop()
        if r in seen:
            continue
        seen.add(r)
        users = _users(r)
        norm_muls = {}
        for u in users:
            if u.target is aten.pow.Tensor_Scalar and u.args[0] is r:
                mul = _rms_norm(r, u, hidden)
                norm_muls[mul] = _norm_output(ir, mul, hidden)
        for u in users:
            if u.op == "output":
                raise NotRotatable(f"{r.name}: the residual stream is an output")
            if u in norm_muls:
                plan.norms.append(norm_muls[u])
            elif u.target is aten.pow.Tensor_Scalar and u.args[0] is r:
                continue
            elif _rowwise(u, hidden):
                frontier.append(u)
            elif u.target is aten.mul.Tensor and not isinstance(
                    u.args[1] if u.args[0] is r else u.args[0], Node):
                frontier.append(u)  # a scalar multiple (e.g. an embedding scale) commutes
            elif u.target is aten.add.Tensor and len(u.args) == 2 and r in u.args \
                    and u.args[0] is not u.args[1]:
                other = u.args[1] if u.args[0] is r else u.args[0]
                if other in seen:
                    frontier.append(u)  # two stream values added: still the stream
                else:
                    plan.writers.append(_writer(ir, other, hidden))
                    frontier.append(u)
            else:
                raise NotRotatable(f"{u.name} ({u.target}) reads the residual stream; "
                                   "only RMSNorms and adds commute with a rotation")
    if not plan.norms:
        raise NotRotatable("no RMSNorm reads the residual stream")
    _check_weights(ir, plan)
    return plan


def _check_weights(ir: IR, plan: Plan) -> None:
    """Every rotated weight must be read only where it is rotated the same way."""
    readers = {r for n in plan.norms for r in n.readers}
    for table in plan.tables:
        for u in table.users:
            if u is not plan.embedding and u not in readers:
                raise NotRotatable(f"the embedding table is also read by {u.name}")
    for lin in [*plan.writers, *readers]:
        for w in lin.args[1:3]:
            if w is None or w in plan.tables:
                continue
            if len(w.users) != 1:
                raise NotRotatable(f"{w.name} is read by several ops (shared weight)")
    for norm in plan.norms:
        if norm.weight is not None and any(u.target is not aten.mul.Tensor
                                           for u in norm.weight.users):
            raise NotRotatable(f"{norm.weight.name} is read other than as a norm weight")


@torch.no_grad()
def rotate_ir(ir: IR, kind: str = "hadamard", seed: int = 0) -> dict:
    """Rotate ``ir``'s residual stream in place; returns a JSON summary (``rotated`` false
    with a ``reason`` when the graph is not a pre-RMSNorm stream of linears)."""
    try:
        plan = plan_rotation(ir)
    except NotRotatable as err:
        return {"rotated": False, "reason": str(err)}
    q = rotation(kind, plan.hidden, seed)

    def put(node: Node, value: torch.Tensor) -> None:
        ir.set_weight(node, value.to(ir.get_weight(node).dtype))

    table = ir.get_weight(plan.table)
    rotated = (table.double() @ q).to(table.dtype)
    for node in plan.tables:  # one tensor for all of them: a tied table stays tied
        ir.set_weight(node, rotated)
    for lin in plan.writers:
        put(lin.args[1], q.t() @ ir.get_weight(lin.args[1]).double())
        if len(lin.args) > 2 and lin.args[2] is not None:
            put(lin.args[2], ir.get_weight(lin.args[2]).double() @ q)
    ones: dict[Node, Node] = {}
    mix_added = False
    folded = 0
    for norm in plan.norms:
        g = (ir.get_weight(norm.weight).double() if norm.weight is not None
             else torch.ones(plan.hidden, dtype=torch.float64))
        for lin in norm.readers:
            if lin.args[1] in plan.tables:
                if not torch.equal(g, torch.ones_like(g)):
                    _insert_mix(ir, lin, (q.t() * g) @ q, table.dtype)
                    mix_added = True
                continue
            put(lin.args[1], (ir.get_weight(lin.args[1]).double() * g) @ q)
        if norm.weight is not None:
            folded += 1
            _reset_weight(ir, norm, ones)
    ir.refresh_meta()
    ir.changed()
    readers = sum(len(n.readers) for n in plan.norms)
    return {"rotated": True, "kind": kind, "seed": seed, "hidden": plan.hidden,
            "readers": readers, "writers": len(plan.writers), "norms_folded": folded,
            "mix": mix_added}


def _reset_weight(ir: IR, norm: Norm, ones: dict) -> None:
    """The norm's weight becomes ones (kept as a parameter: ``distill{trainable=norms}`` can
    still tune it); a weight other norms share gets a fresh ones tensor."""
    w = norm.weight
    value = ir.get_weight(w)
    if len(w.users) == 1:
        ir.set_weight(w, torch.ones_like(value))
        return
    if w not in ones:
        ones[w] = ir.add_weight(f"{w.name.removeprefix('p_')}_folded", torch.ones_like(value))
    norm.weight_mul.replace_input_with(w, ones[w])


def _insert_mix(ir: IR, head: Node, mix: torch.Tensor, dtype: torch.dtype) -> None:
    """``head(x)`` -> ``head(linear(x, mix))``."""
    node = ir.add_weight("rotate_head_mix", mix.to(dtype))
    x = head.args[0]
    with ir.graph.inserting_before(head):
        mixed = ir.graph.call_function(LINEAR, (x, node))
    head.replace_input_with(x, mixed)
