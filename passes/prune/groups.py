"""``prune-groups``: which channels, heads and blocks can be removed, and what goes with them.

A *unit* is one connected component of the channel union-find (see :mod:`labels`): the
smallest thing that can be removed without breaking the graph (an MLP neuron across gate/up/
down, an attention head across q/k/v/o, a conv filter through BN and a depthwise conv, a
residual-stream channel across every layer). Units with the same set of weight slices form a
*group* (all 64 neurons of one MLP); pruning ranks units within and across groups. Blocks are
residual branches ``x + f(x)`` under one module path that can be dropped whole (depth pruning).

Grouped-query attention gives two overlapping group kinds per attention: ``query-head`` (one
query head: its q rows and o columns; each unit's ``parent`` is its KV head, and a removal must
take the same number of query heads from every KV group of the attention) and ``kv-group``
(a K/V head together with all the query heads sharing it, a unit spanning several union-find
components: ``Unit.roots``). A pruning uses one of the two per attention, never both.

The JSON form lives in ``ir.annotations["prune-groups"]`` and is what ``slimc analyze`` shows.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from slimc.passes.prune.labels import Propagation, op_name, propagate
from torch.fx import Node

from slimc.ir import IR
from slimc.passmanager import AnalysisPass, PassContext, PassOptions

Kind = Literal["mlp-channel", "attention-head", "kv-group", "query-head", "residual",
               "conv-filter", "block"]


@dataclass
class Unit:
    """One removable structure: its channel ids and, per (weight, axis), the indices it owns."""

    root: int
    ids: list[int]
    slices: dict[tuple[str, int], list[int]]
    #: Further union-find roots removed with this unit (a KV group's query heads).
    extra_roots: list[int] = field(default_factory=list)
    #: A query head's KV head (its root) under grouped-query attention.
    parent: int | None = None

    @property
    def roots(self) -> list[int]:
        """Every union-find root whose channels go when this unit is removed."""
        return [self.root, *self.extra_roots]

    @property
    def width(self) -> int:
        """Channels per unit in its widest weight slice (head_dim x heads for a KV group)."""
        return max(len(v) for v in self.slices.values())


@dataclass
class Group:
    """Interchangeable units of one structure (the neurons of one MLP, heads of one layer)."""

    index: int
    kind: Kind
    module_path: str
    units: list[Unit]
    #: (weight, axis) -> full length along that axis (what the unit indices refer to).
    extents: dict[tuple[str, int], int] = field(default_factory=dict)

    def params_per_unit(self, ir_shapes: dict[str, tuple[int, ...]]) -> int:
        """Scalars removed with one unit (assuming equal-width units)."""
        unit = self.units[0]
        total = 0
        for (weight, axis), idx in unit.slices.items():
            shape = ir_shapes[weight]
            total += len(idx) * int(np.prod(shape)) // shape[axis]
        return total

    @property
    def kv_groups(self) -> list[list[int]]:
        """Unit indices per KV head (``query-head`` groups; otherwise one list of all)."""
        parts: dict[Any, list[int]] = defaultdict(list)
        for i, unit in enumerate(self.units):
            parts[unit.parent].append(i)
        return list(parts.values())

    def to_json(self) -> dict[str, Any]:
        members = [{"param": w, "axis": a, "ranges": _ranges(idx)}
                   for (w, a), idx in sorted(self.units[0].slices.items())]
        out = {"index": self.index, "kind": self.kind, "module_path": self.module_path,
               "units": len(self.units), "unit_width": self.units[0].width,
               "first_unit_members": members,
               "members": [{"param": w, "axis": a, "length": n}
                           for (w, a), n in sorted(self.extents.items())]}
        if self.kind == "query-head":
            out["kv_groups"] = len(self.kv_groups)
        return out


@dataclass
class Block:
    """A removable residual block: replacing each add by its skip input removes it."""

    module_path: str
    #: (add node, index of the skip operand) pairs.
    adds: list[tuple[str, int]]
    params: int

    def to_json(self) -> dict[str, Any]:
        return {"kind": "block", "module_path": self.module_path,
                "residual_adds": [a for a, _ in self.adds], "params": self.params}


@dataclass
class PruneGroups:
    """The analysis result: groups, blocks and the propagation they came from."""

    groups: list[Group]
    blocks: list[Block]
    propagation: Propagation
    roots: np.ndarray
    pinned_units: int

    def to_json(self) -> dict[str, Any]:
        return {"groups": [g.to_json() for g in self.groups],
                "blocks": [b.to_json() for b in self.blocks],
                "pinned_units": self.pinned_units,
                "summary": dict(sorted(_count(g.kind for g in self.groups).items()))}

    def prunable(self, kinds: set[str]) -> list[Group]:
        return [g for g in self.groups if g.kind in kinds]


def _count(items) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for item in items:
        out[item] += 1
    return out


def _ranges(idx: list[int]) -> list[list[int]]:
    """[0,1,2,5,6] -> [[0,3],[5,7]] (half-open), compact for JSON."""
    out: list[list[int]] = []
    for i in sorted(idx):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def build_groups(ir: IR, prop: Propagation) -> PruneGroups:
    """Units from the union-find, grouped by the weight slices they own, then classified."""
    roots = prop.uf.roots()
    pinned_roots = {int(roots[i]) for i in prop.pinned}
    by_root: dict[int, Unit] = {}
    for (weight, axis), ids in prop.members.items():
        for index, cid in enumerate(ids.tolist()):
            if cid < 0:
                continue
            root = int(roots[cid])
            unit = by_root.setdefault(root, Unit(root, [], defaultdict(list)))
            unit.slices[(weight, axis)].append(index)
    for cid, root in enumerate(roots.tolist()):
        if root in by_root:
            by_root[root].ids.append(cid)
    for unit in by_root.values():
        unit.slices = dict(unit.slices)
    producers = {p.node: p for p in prop.producers}
    id_producer = np.empty(len(roots), dtype=object)
    for p in prop.producers:
        id_producer[p.offset:p.offset + p.size] = p.node
    kinds, composites = _gqa_units(prop, roots, by_root)
    signatures: dict[tuple, list[Unit]] = defaultdict(list)
    pinned = 0
    for root, unit in [*by_root.items(), *composites.items()]:
        if root in composites and unit is by_root.get(root):
            continue  # a K/V head goes only with its query heads (the composite)
        if any(r in pinned_roots for r in unit.roots):
            pinned += 1
            continue
        key = (kinds.get(id(unit)),) + tuple(sorted((w, a, len(i))
                                                    for (w, a), i in unit.slices.items()))
        signatures[key].append(unit)
    shapes = {n.name: tuple(n.meta["val"].shape) for n in ir.nodes("placeholder")
              if isinstance(n.meta.get("val"), torch.Tensor)}
    groups = []
    for (special, *_), units in signatures.items():
        if len(units) < 2:
            continue
        ids = set().union(*(u.ids for u in units))
        kind = special or _classify(units, ids, prop, id_producer)
        first = sorted({id_producer[i] for i in units[0].ids if id_producer[i]},
                       key=lambda n: [p.node for p in prop.producers].index(n))
        path = producers[first[0]].module_path if first else ""
        extents = {(w, a): shapes[w][a] for (w, a) in units[0].slices}
        groups.append(Group(len(groups), kind, _common_prefix(path, kind), units, extents))
    return PruneGroups(groups, find_blocks(ir), prop, roots, pinned)


def _gqa_units(prop: Propagation, roots: np.ndarray, by_root: dict[int, Unit]
               ) -> tuple[dict[int, Kind], dict[int, Unit]]:
    """Query heads kept apart from their K/V heads (see :mod:`labels`): mark them
    ``query-head`` (with their KV head as ``parent``) and build one ``kv-group`` unit per K/V
    head spanning it and its query heads. Returns (kind by ``id(unit)``, composite by root)."""
    readers: dict[int, set[int]] = defaultdict(set)
    for rep in prop.repeats:
        if rep.collapsed:
            continue
        src = roots[rep.source.numpy()]
        for row, slot in (rep.ties >= 0).nonzero().tolist():
            readers[int(src[row])].add(int(roots[int(rep.ties[row, slot])]))
    kinds: dict[int, Kind] = {}
    composites: dict[int, Unit] = {}
    for kv, queries in readers.items():
        if kv in queries or kv not in by_root or not all(q in by_root for q in queries):
            continue  # degenerate: already one component
        heads = sorted((by_root[q] for q in queries), key=lambda u: min(min(v) for v in
                                                                        u.slices.values()))
        slices: dict[tuple[str, int], list[int]] = defaultdict(list)
        for unit in [by_root[kv], *heads]:
            for key, idx in unit.slices.items():
                slices[key].extend(idx)
            if unit is not by_root[kv]:
                unit.parent = kv
                kinds[id(unit)] = "query-head"
        ids = by_root[kv].ids + [i for u in heads for i in u.ids]
        composite = Unit(kv, ids, {k: sorted(v) for k, v in slices.items()},
                         [u.root for u in heads])
        composites[kv] = composite
        kinds[id(composite)] = "kv-group"
    return kinds, composites


def _classify(units: list[Unit], ids: set[int], prop: Propagation, id_producer) -> Kind:
    if ids & prop.attention:
        counts = _count(id_producer[i] for i in units[0].ids if id_producer[i] is not None)
        return "kv-group" if len(set(counts.values())) > 1 else "attention-head"
    if ids & prop.merged and len({id_producer[i] for i in units[0].ids}) > 2:
        return "residual"
    if ids & prop.stat_coupled:
        return "residual"
    if ids & prop.conv:
        return "conv-filter"
    return "mlp-channel"


def _common_prefix(path: str, kind: str) -> str:
    if kind in ("attention-head", "kv-group", "query-head", "mlp-channel"):
        return path.rsplit(".", 1)[0] if "." in path else path
    return path


# -- blocks -------------------------------------------------------------------------------


def _path(ir: IR, node: Node) -> str:
    return ir.node_info(node).module_path


def find_blocks(ir: IR) -> list[Block]:
    """Module paths whose output is ``skip + branch`` chains with the skip from outside.

    Removing such a block means every residual add in it returns its skip operand; the branches
    are then dead code. A block whose main path has other ops (BERT's post-norm) is not one.
    """
    adds: dict[str, list[tuple[Node, int]]] = defaultdict(list)
    for node in ir.nodes("call_function"):
        if op_name(node) != "aten.add" or len(node.all_input_nodes) != 2:
            continue
        path = _path(ir, node)
        if not path:
            continue
        a, b = node.args[:2]
        if not (isinstance(a, Node) and isinstance(b, Node)):
            continue
        inside = [_path(ir, _uncast(x)).startswith(path + ".") for x in (a, b)]
        if inside[0] != inside[1]:
            adds[path].append((node, 0 if inside[1] else 1))
    blocks = []
    for path, chain in adds.items():
        if _is_residual_chain(ir, path, chain):
            params = _block_params(ir, path)
            blocks.append(Block(path, [(n.name, i) for n, i in chain], params))
    return blocks


def _uncast(node: Node) -> Node:
    """Skip dtype casts (Llama's RMSNorm casts its input; the cast sits in the norm module)."""
    while op_name(node) in ("aten.to", "aten._to_copy") and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _is_residual_chain(ir: IR, path: str, chain: list[tuple[Node, int]]) -> bool:
    """The chain's first skip comes from outside ``path``, each next skip is the previous add,
    and the last add is the only value of ``path`` used outside it."""
    prev = None
    for node, skip in chain:
        src = _uncast(node.args[skip])
        if prev is None:
            if _path(ir, src) == path or _path(ir, src).startswith(path + "."):
                return False
        elif src is not prev:
            return False
        prev = node
    last = chain[-1][0]
    for node in ir.nodes("call_function"):
        p = _path(ir, node)
        if p != path and not p.startswith(path + "."):
            continue
        if node is last or op_name(node) in ("aten._assert_tensor_metadata",):
            continue
        if any(_path(ir, u) != path and not _path(ir, u).startswith(path + ".")
               for u in node.users if u.op == "call_function"):
            return False
        if any(u.op == "output" for u in node.users):
            return False
    return True


def _block_params(ir: IR, path: str) -> int:
    seen = set()
    total = 0
    for node in ir.nodes("call_function"):
        p = _path(ir, node)
        if p != path and not p.startswith(path + "."):
            continue
        for arg in node.all_input_nodes:
            if arg.op == "placeholder" and arg.name not in seen:
                spec = ir.placeholder_spec(arg)
                if spec is not None and spec.kind.name == "PARAMETER":
                    seen.add(arg.name)
                    total += ir.get_weight(arg).numel()
    return total


class PruneGroupsAnalysis(AnalysisPass):
    """Find coupled channel groups (MLP neurons, attention heads/KV groups, conv filters,
    residual channels) and removable blocks; stored in ir.annotations["prune-groups"]."""

    name = "prune-groups"

    class Options(PassOptions):
        min_units: int = Field(2, ge=1, description="Ignore groups with fewer units.")
        pin_outputs: bool = Field(True, description="Keep every channel that reaches a graph "
                                  "output (false: outputs may get narrower).")

    def run(self, ir: IR, ctx: PassContext, options: PassOptions) -> PruneGroups:
        result = build_groups(ir, propagate(ir, options.pin_outputs))
        result.groups = [g for g in result.groups if len(g.units) >= options.min_units]
        ir.annotations["prune-groups"] = result.to_json()
        return result
