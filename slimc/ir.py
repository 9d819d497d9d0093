"""slimc's IR: an exported FX graph with its weights, per-node metadata and pass annotations.

The IR is a thin, documented layer over :class:`torch.export.ExportedProgram` (ATen-level
``torch.fx`` graph with lifted parameters). It stays executable at every stage, so any pass can
measure what it did, and it round-trips through ``torch.export.save`` with slimc's own data
(annotations, input/output names) stored as an extra file inside the same ``.pt2`` archive.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, OutputKind, TensorArgument
from torch.fx import Node

from slimc.errors import UsageError

_EXTRA_FILE = "slimc.json"
_TORCH_PLEA = re.compile(r"\s*\(Could this error message be improved\?.*$")
_IR_FORMAT_VERSION = 1


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a model input or output (what manifest.json records).

    ``shape`` is the example shape; ``dims`` (None when every dim is fixed) gives each dim as an
    int or, for a dynamic one, ``{"name", "min", "max"}`` (dims sharing a name must agree).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    dims: tuple[int | dict[str, Any], ...] | None = None

    def to_json(self) -> dict[str, Any]:
        data = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.dims is not None:
            data["dims"] = list(self.dims)
        return data

    @classmethod
    def of(cls, name: str, value: torch.Tensor, symbols: dict[str, str] | None = None,
           constraints: dict | None = None) -> TensorSpec:
        dims = tuple(dim_json(d, symbols or {}, constraints or {}) for d in value.shape)
        dynamic = any(isinstance(d, dict) for d in dims)
        return cls(name, tuple(size_hint(d) for d in value.shape), dtype_name(value.dtype),
                   dims if dynamic else None)


def size_hint(dim: Any) -> int:
    """A dimension's size: itself when fixed, the example size it was captured at when symbolic
    (no guard is added, unlike ``int(symint)``)."""
    if isinstance(dim, torch.SymInt):
        hint = getattr(dim.node, "hint", None)
        if hint is not None:
            return int(hint)
        bound = dim.node.shape_env.bound_sympy(dim.node.expr)
        return int(bound.lower)
    return int(dim)


def hinted_shape(value: torch.Tensor) -> tuple[int, ...]:
    """A (fake) tensor's shape with every symbolic dim at its example size, read WITHOUT a guard.

    ``int(d)`` / ``numel()`` comparisons on a dynamic IR's ``meta["val"]`` would guard and pin the
    program's symbol (``s53 -> 128``) for the whole IR: every later fake value turns static while
    the graph keeps its ``sym_size`` nodes, and the TVM import mixes the two (issue: dynamic
    sequence at -O2). Torch-side code that reads sizes of IR meta values uses this instead."""
    return tuple(size_hint(d) for d in value.shape)


def hinted_numel(value: torch.Tensor) -> int:
    """Element count of a (fake) tensor at its example sizes (no guard: see
    :func:`hinted_shape`)."""
    n = 1
    for d in hinted_shape(value):
        n *= d
    return n


def dim_json(dim: Any, symbols: dict[str, str], constraints: dict) -> int | dict[str, Any]:
    """A fixed dim as an int; a symbolic one as ``{"name", "min", "max"}`` with torch's symbols
    renamed by ``symbols`` (``s41`` -> ``seq``). Bounds come from the program's
    ``range_constraints`` (the shape environment alone assumes sizes of at least 2)."""
    if not isinstance(dim, torch.SymInt):
        return int(dim)
    expr = dim.node.expr
    if getattr(expr, "is_number", False):  # specialised since capture (see IR.freeze_dims)
        return int(expr)
    bound = constraints.get(expr) or dim.node.shape_env.bound_sympy(expr)
    name = str(expr)
    for torch_name, user_name in sorted(symbols.items(), key=lambda kv: -len(kv[0])):
        name = name.replace(torch_name, user_name)
    upper = int(bound.upper) if bound.upper.is_finite else None
    return {"name": name, "min": int(bound.lower), "max": upper}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the spelling numpy and TVM share)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class NodeInfo:
    """What slimc knows about one graph node, independent of torch internals."""

    name: str
    op: str
    target: str
    shape: tuple[int, ...] | None
    dtype: str | None
    module_path: str
    module_type: str


def _realign_signature(program) -> None:
    """Point the graph signature at the placeholder / output nodes of ``program.graph`` again.

    Copying an fx graph renames nodes whose names shadow Python builtins (a user input called
    ``input`` becomes ``input_1``) while the deep-copied signature keeps the old names; specs
    and placeholders (outputs) correspond by position."""
    signature = program.graph_signature
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    for spec, node in zip(signature.input_specs, placeholders, strict=False):
        if hasattr(spec.arg, "name"):
            spec.arg.name = node.name
    output = next((n for n in program.graph.nodes if n.op == "output"), None)
    if output is not None:
        values = output.args[0] if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
        for spec, value in zip(signature.output_specs, values, strict=False):
            if hasattr(spec.arg, "name") and isinstance(value, Node):
                spec.arg.name = value.name


class IR:
    """An executable, annotatable, serializable model graph.

    ``annotations`` is a free-form, JSON-serializable dict that passes write results into
    (keyed by pass name); it is saved with the IR.
    """

    def __init__(
        self,
        program: ExportedProgram,
        *,
        name: str = "model",
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
        annotations: dict[str, Any] | None = None,
    ) -> None:
        self.program = program
        self.name = name
        user_inputs = [s for s in program.graph_signature.input_specs
                       if s.kind == InputKind.USER_INPUT]
        n_out = len(self._user_output_positions())
        self.input_names = list(input_names or [s.arg.name for s in user_inputs])
        self.output_names = list(output_names or [f"output{i}" for i in range(n_out)])
        if len(self.output_names) != n_out:
            self.output_names = [f"output{i}" for i in range(n_out)]
        self.annotations: dict[str, Any] = annotations if annotations is not None else {}
        #: Bumped by :meth:`changed`: analysis results are cached per (IR, version), so a
        #: result computed before an edit is never served after it.
        self.version = 0

    # -- structure -------------------------------------------------------------------------

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.program.graph_module

    def nodes(self, op: str | None = None) -> Iterator[Node]:
        """Graph nodes in topological order, optionally only those with ``node.op == op``."""
        for node in self.graph.nodes:
            if op is None or node.op == op:
                yield node

    def node_info(self, node: Node) -> NodeInfo:
        """Shape, dtype and the module path (e.g. ``model.layers.0.mlp.up_proj``) of a node."""
        val = node.meta.get("val")
        shape = tuple(size_hint(d) for d in val.shape) if isinstance(val, torch.Tensor) else None
        dtype = dtype_name(val.dtype) if isinstance(val, torch.Tensor) else None
        stack = node.meta.get("nn_module_stack") or {}
        path, mtype = ("", "")
        if stack:
            path, mtype = list(stack.values())[-1]
            mtype = mtype if isinstance(mtype, str) else getattr(mtype, "__qualname__", str(mtype))
        target = node.target if isinstance(node.target, str) else str(node.target)
        return NodeInfo(node.name, node.op, target, shape, dtype, path, mtype)

    def to_networkx(self) -> nx.DiGraph:
        """The dataflow graph as networkx; vertex attributes come from :meth:`node_info`."""
        g = nx.DiGraph()
        for node in self.graph.nodes:
            g.add_node(node.name, **asdict(self.node_info(node)))
            for src in node.all_input_nodes:
                g.add_edge(src.name, node.name)
        return g

    # -- parameters ------------------------------------------------------------------------

    def _state_value(self, spec: InputSpec) -> torch.Tensor:
        if spec.kind == InputKind.PARAMETER:
            return self.program.state_dict[spec.target]
        if spec.kind == InputKind.BUFFER:
            if spec.persistent is False:
                return self.program.constants[spec.target]
            return self.program.state_dict[spec.target]
        if spec.kind == InputKind.CONSTANT_TENSOR:
            return self.program.constants[spec.target]
        raise UsageError(f"slimc cannot execute graph input of kind {spec.kind.name}.")

    def weights(self) -> dict[str, torch.Tensor]:
        """Every parameter, buffer and constant tensor, keyed by its placeholder name."""
        return {
            s.arg.name: self._state_value(s)
            for s in self.program.graph_signature.input_specs
            if s.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
        }

    def placeholder_spec(self, node: Node) -> InputSpec | None:
        for spec in self.program.graph_signature.input_specs:
            if spec.arg.name == node.name:
                return spec
        return None

    def get_weight(self, node: Node) -> torch.Tensor:
        """The tensor behind a parameter/buffer/constant placeholder node."""
        spec = self.placeholder_spec(node)
        if spec is None or spec.kind == InputKind.USER_INPUT:
            raise KeyError(f"{node.name} is not a weight placeholder")
        return self._state_value(spec)

    def set_weight(self, node: Node, value: torch.Tensor) -> None:
        """Replace the tensor behind a weight placeholder (shape may change; fix ``meta`` too)."""
        spec = self.placeholder_spec(node)
        if spec is None or spec.kind == InputKind.USER_INPUT:
            raise KeyError(f"{node.name} is not a weight placeholder")
        value = value.detach()
        if spec.kind == InputKind.PARAMETER:
            self.program.state_dict[spec.target] = torch.nn.Parameter(value, requires_grad=False)
        elif spec.kind == InputKind.BUFFER and spec.persistent is not False:
            self.program.state_dict[spec.target] = value
        else:
            self.program.constants[spec.target] = value
        node.meta["val"] = _fake_like(node, value)

    def release_weights(self) -> int:
        """Replace every weight with a ``meta`` tensor of its shape and dtype; returns the bytes
        let go.

        Why: once the IR is lowered, a compile that will not run it again (no dynamic sizes to
        check, no task metric, no ``--save-ir``) would otherwise keep a full copy of the model
        alive while the backend builds and writes its own. Shapes, dtypes and the graph stay;
        running or saving the IR afterwards fails loudly (meta tensors hold no data).
        """
        released = 0
        for table in (self.program.state_dict, self.program.constants):
            for key, value in list(table.items()):
                if not isinstance(value, torch.Tensor) or value.device.type == "meta":
                    continue
                released += value.numel() * value.element_size()
                empty = torch.empty(value.shape, dtype=value.dtype, device="meta")
                table[key] = (torch.nn.Parameter(empty, requires_grad=False)
                              if isinstance(value, torch.nn.Parameter) else empty)
        return released

    def add_weight(self, name: str, value: torch.Tensor) -> Node:
        """Add a new parameter placeholder (before the user inputs) and return its node."""
        taken = {n.name for n in self.graph.nodes}
        base, i = name.replace(".", "_"), 0
        node_name = f"p_{base}"
        while node_name in taken:
            i += 1
            node_name = f"p_{base}_{i}"
        # Weights go before the first user input; find it through the signature (one pass)
        # rather than asking for every placeholder's spec, which made adding N weights O(N^3).
        specs = self.program.graph_signature.input_specs
        index = next(i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT)
        first_user_name = specs[index].arg.name
        first_user = next(n for n in self.graph.nodes
                          if n.op == "placeholder" and n.name == first_user_name)
        with self.graph.inserting_before(first_user):
            node = self.graph.placeholder(node_name)
        target = f"slimc.{node_name}"
        specs.insert(index, InputSpec(InputKind.PARAMETER, TensorArgument(node.name), target))
        self.program.state_dict[target] = torch.nn.Parameter(value.detach(), requires_grad=False)
        node.meta["val"] = _fake_like(first_user, value)
        return node

    def _is_user_input(self, node: Node) -> bool:
        spec = self.placeholder_spec(node)
        return spec is not None and spec.kind == InputKind.USER_INPUT

    def drop_dead_ops(self) -> int:
        """Erase ops whose results nothing uses; returns how many went.

        torch's own DCE keeps every op it calls impure, and that includes random ones
        (``dropout``, which an eval-mode export keeps with ``train=False``; SDPA with its
        ``dropout_p``) and metadata asserts. A branch a transform cut off (a removed block's
        attention and MLP ending in ``dropout``) would then keep its weights alive: the
        artifact stores them and the manifest claims no saving. Random ops whose results are
        unused are dropped here too (an inference graph does not depend on their RNG draws);
        ops that write to an argument are kept.
        """
        removed = 0
        # consumers before producers: a chain whose end goes frees the rest in the same pass
        for node in reversed(list(self.nodes("call_function"))):
            if node.users or not _droppable(node):
                continue
            self.graph.erase_node(node)
            removed += 1
        return removed

    def remove_unused_weights(self) -> int:
        """Drop weight placeholders that no node uses any more; returns how many went."""
        removed = 0
        specs = self.program.graph_signature.input_specs
        spec_by_name = {s.arg.name: s for s in specs}
        for node in list(self.nodes("placeholder")):
            spec = spec_by_name.get(node.name)
            if spec is None or spec.kind == InputKind.USER_INPUT or node.users:
                continue
            specs.remove(spec)
            if spec.kind == InputKind.BUFFER:
                # A buffer may be mutated in place by the graph; keep it unless unused everywhere.
                if any(o.target == spec.target for o in self.program.graph_signature.output_specs):
                    specs.append(spec)
                    continue
            self.program.state_dict.pop(spec.target, None)
            self.program.constants.pop(spec.target, None)
            self.graph.erase_node(node)
            removed += 1
        return removed

    def _distinct_weights(self) -> list[torch.Tensor]:
        """Weights with tied ones counted once (GPT-2's lm_head *is* its embedding table)."""
        seen: set[tuple] = set()
        distinct = []
        for t in self.weights().values():
            key = _storage_key(t)
            if key not in seen:
                seen.add(key)
                distinct.append(t)
        return distinct

    def num_params(self) -> int:
        """Number of model weights (parameters, buffers, constants; tied ones once).

        Floating-point tensors count element by element; quantized weights count as the
        weights they stand for (int8 codes one each, packed int4 bytes two each), and their
        scales and zero points, which are quantization metadata, do not count: an int8 model
        has as many parameters as its fp32 original.
        """
        def key(t: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
            return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))

        codes: dict[tuple, int] = {}
        metadata: set[tuple] = set()
        for node in self.nodes("call_function"):
            name = str(node.target).removeprefix("slimc.").split(".")[0]
            if name == "coded_scale" and str(node.target).startswith("slimc."):
                # a -qs grid's codes and row units (slimc.coded_scales): metadata
                for arg in node.args[:2]:
                    if isinstance(arg, Node) and arg.op == "placeholder":
                        metadata.add(key(self.get_weight(arg)))
                continue
            if name not in _QUANTIZED_ARGS or not str(node.target).startswith("slimc."):
                continue
            weight_at, per_element, meta_at = _QUANTIZED_ARGS[name]
            for i, arg in enumerate(node.args):
                if not isinstance(arg, Node) or arg.op != "placeholder":
                    continue
                try:
                    t = self.get_weight(arg)
                except KeyError:
                    continue
                if i == weight_at:
                    codes[key(t)] = t.numel() * per_element if per_element else \
                        _lowbit_weights(node, t)
                elif i in meta_at:
                    metadata.add(key(t))
        return sum(codes.values()) + sum(
            t.numel() for t in self._distinct_weights()
            if t.is_floating_point() and key(t) not in metadata and key(t) not in codes)

    def weight_bytes(self) -> int:
        """Bytes of every stored weight tensor at its current dtype (tied ones once)."""
        return sum(t.numel() * t.element_size() for t in self._distinct_weights())

    # -- execution -------------------------------------------------------------------------

    def _user_output_positions(self) -> list[int]:
        return [i for i, s in enumerate(self.program.graph_signature.output_specs)
                if s.kind == OutputKind.USER_OUTPUT]

    def input_specs(self) -> list[TensorSpec]:
        specs = []
        symbols = self.annotations.get("symbols", {})
        for name, node in zip(self.input_names, self._user_placeholders(), strict=True):
            specs.append(self._frozen(TensorSpec.of(name, node.meta["val"], symbols,
                                                    self.program.range_constraints), "inputs"))
        return specs

    def freeze_dims(self) -> None:
        """Remember which dims are dynamic, as captured.

        Code that reads a fake tensor's size as an int (``int(symint)``, FLOP counts, byte
        counts) makes torch specialise the symbol to its example value; the graph and the
        compiled library stay dynamic, but the shapes in ``meta`` then read as fixed. The
        specs keep the dims recorded here for every dim that still has its captured size.
        """
        self.annotations["dims"] = {
            "inputs": {s.name: list(s.dims) for s in self.input_specs() if s.dims},
            "outputs": {s.name: list(s.dims) for s in self.output_specs() if s.dims}}

    def _frozen(self, spec: TensorSpec, kind: str) -> TensorSpec:
        frozen = self.annotations.get("dims", {}).get(kind, {}).get(spec.name)
        if spec.dims is not None or not frozen or len(frozen) != len(spec.shape):
            return spec
        dims = tuple(d if isinstance(d, dict) and d["min"] <= size <= (d["max"] or size)
                     else size for d, size in zip(frozen, spec.shape, strict=True))
        return TensorSpec(spec.name, spec.shape, spec.dtype,
                          dims if any(isinstance(d, dict) for d in dims) else None)

    @property
    def is_dynamic(self) -> bool:
        """Whether any input has a symbolic (dynamic) dimension."""
        return any(s.dims is not None for s in self.input_specs())

    def output_specs(self) -> list[TensorSpec]:
        out_node = next(iter(reversed(self.graph.nodes)))
        flat = out_node.args[0]
        vals = [flat[i].meta["val"] for i in self._user_output_positions()]
        symbols = self.annotations.get("symbols", {})
        return [self._frozen(TensorSpec.of(n, v, symbols, self.program.range_constraints),
                             "outputs")
                for n, v in zip(self.output_names, vals, strict=True)]

    def _user_placeholders(self) -> list[Node]:
        return [n for n in self.nodes("placeholder") if self._is_user_input(n)]

    def changed(self) -> None:
        """Call after editing the graph: lints it, drops dead code and regenerates its code."""
        self.graph.lint()
        self.graph_module.recompile()
        self.version += 1

    @torch.no_grad()
    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Execute the graph on user inputs (in ``input_names`` order); returns user outputs."""
        if len(inputs) != len(self.input_names):
            raise UsageError(
                f"{self.name} takes {len(self.input_names)} inputs "
                f"({', '.join(self.input_names)}), got {len(inputs)}."
            )
        values = []
        user = iter(inputs)
        for spec in self.program.graph_signature.input_specs:
            values.append(next(user) if spec.kind == InputKind.USER_INPUT
                          else self._state_value(spec))
        flat = self.graph_module(*values)
        flat = flat if isinstance(flat, (tuple, list)) else (flat,)
        return [flat[i] for i in self._user_output_positions()]

    # -- services for passes ------------------------------------------------------------

    def clone(self, share_weights: bool = False) -> IR:
        """An independent copy (graph, weights, annotations): edit it without touching this
        one, e.g. to try a transform and keep the original if it fails.

        ``share_weights``: the copy's weight tables are its own but hold this IR's tensors
        instead of copies. Passes replace weights (:meth:`set_weight`, :meth:`add_weight`),
        they never write into one, so such a copy can be transformed without touching this
        IR while costing no weight memory: a search building candidates from one model
        (each a full copy of SmolLM2's 0.54 GB of fp32 weights before it was quantized).
        Writing into a tensor in place would change both IRs.
        """
        program = self.program
        copies: dict[tuple, torch.Tensor] = {}  # tied weights (one storage) stay tied
        memo: dict[int, Any] = {}

        def dup(value: torch.Tensor) -> torch.Tensor:
            key = _storage_key(value)
            if key not in copies:
                copies[key] = value if share_weights else _copy_tensor(value)
            memo[id(value)] = copies[key]
            return copies[key]

        state = {k: dup(v) for k, v in program.state_dict.items()}
        constants = {k: dup(v) for k, v in program.constants.items()}
        twin = copy.deepcopy(program, memo)
        twin._state_dict = state  # noqa: SLF001 - ExportedProgram has no setter
        twin._constants = constants  # noqa: SLF001
        _realign_signature(twin)
        return IR(twin, name=self.name, input_names=list(self.input_names),
                  output_names=list(self.output_names),
                  annotations=copy.deepcopy(self.annotations))

    def content_hash(self) -> str:
        """sha256 of the graph (ops, wiring, constants in args), the signature and every weight's
        name, dtype, shape and bytes: equal for equal IRs, across processes and runs."""
        h = hashlib.sha256()
        names = {}
        for i, node in enumerate(self.graph.nodes):  # positional names: renaming is no change
            names[node] = f"%{i}"
        for node in self.graph.nodes:
            args = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: names[n])
            h.update(f"{node.op}|{_target_text(node.target)}|{args!r}\n".encode())
        for spec in self.program.graph_signature.input_specs:
            h.update(f"in|{spec.kind.name}|{getattr(spec.arg, 'name', '')}\n".encode())
            if spec.kind != InputKind.USER_INPUT:
                t = self._state_value(spec).detach().contiguous().cpu()
                h.update(f"{t.dtype}|{tuple(t.shape)}\n".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        for spec in self.program.graph_signature.output_specs:
            h.update(f"out|{spec.kind.name}|{getattr(spec.arg, 'name', '')}\n".encode())
        h.update(json.dumps([self.input_names, self.output_names]).encode())
        return h.hexdigest()

    def refresh_meta(self) -> None:
        """Re-run shape inference with fake tensors so every ``meta['val']`` is current (after
        a pass changed weight shapes or rewired ops)."""
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        nodes = {n.name: n for n in self.nodes("placeholder")}
        specs = self.program.graph_signature.input_specs
        user = [nodes[s.arg.name].meta["val"] for s in specs if s.kind == InputKind.USER_INPUT]
        # A dynamic IR re-propagates its own symbolic fake inputs in their shape environment:
        # fresh inputs built from ``val.shape`` would guard (pin ``s53`` to its example size)
        # and leave static values on a graph that still computes ``sym_size``.
        modes = [v.fake_mode for v in user if isinstance(v, torch.Tensor)
                 and getattr(v, "fake_mode", None) is not None
                 and getattr(v.fake_mode, "shape_env", None) is not None
                 and any(isinstance(d, torch.SymInt) for d in v.shape)]
        mode = modes[0] if modes else FakeTensorMode(allow_non_fake_inputs=True)
        values = []
        for spec in specs:
            node = nodes[spec.arg.name]
            if spec.kind == InputKind.USER_INPUT:
                val = node.meta["val"]
                values.append(val if modes and getattr(val, "fake_mode", None) is mode else
                              mode.from_tensor(torch.empty(hinted_shape(val), dtype=val.dtype),
                                               static_shapes=True))
            else:
                values.append(mode.from_tensor(self.get_weight(node), static_shapes=True))
        self.graph_module.recompile()
        allowed = mode.allow_non_fake_inputs
        mode.allow_non_fake_inputs = True  # constants a pass wrote into the graph
        try:
            FakeTensorProp(self.graph_module, mode).propagate_dont_convert_inputs(*values)
        finally:
            mode.allow_non_fake_inputs = allowed

    # -- persistence -----------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the IR as one ``.pt2`` archive (weights + graph + slimc data), atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        extra = {"format": _IR_FORMAT_VERSION, "name": self.name,
                 "input_names": self.input_names, "output_names": self.output_names,
                 "annotations": self.annotations}
        torch.export.save(self.program, tmp, extra_files={_EXTRA_FILE: json.dumps(extra)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> IR:
        """Load a ``.pt2`` written by :meth:`save` or by plain ``torch.export.save``."""
        from slimc.pt2_safety import captured_torch_log, check_archive, weights_only_loads

        extra_files = {_EXTRA_FILE: ""}
        if not Path(path).is_file():
            raise UsageError(f"No such file: {path}.")
        check_archive(path)  # never unpickle: a .pt2 from a stranger must not run code
        try:
            with weights_only_loads(), captured_torch_log() as logged:
                program = torch.export.load(path, extra_files=extra_files)
        except FileNotFoundError:
            raise UsageError(f"No such file: {path}.") from None
        except Exception as exc:  # noqa: BLE001 - any failure here means a bad archive
            cause = [ln.strip() for ln in logged if ln.strip()]
            reason = _TORCH_PLEA.sub("", cause[-1]) if cause else (
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            raise UsageError(
                f"{path} is not a readable torch.export archive ({reason}).",
                hint="Re-create it with torch.export.save(torch.export.export(model, args), path).",
            ) from None
        try:
            extra = json.loads(extra_files[_EXTRA_FILE]) if extra_files[_EXTRA_FILE] else {}
        except ValueError:
            extra = {}
        if not isinstance(extra, dict):
            extra = {}
        name = extra.get("name") or Path(path).stem
        return cls(program, name=name, input_names=extra.get("input_names"),
                   output_names=extra.get("output_names") or _output_names(program),
                   annotations=extra.get("annotations", {}))

    def __repr__(self) -> str:
        n = sum(1 for _ in self.nodes("call_function"))
        return (f"IR({self.name!r}, {n} ops, {self.num_params():,} params, "
                f"inputs={self.input_names}, outputs={self.output_names})")


#: slimc's quantized ops (``slimc::NAME``): argument position of the weight codes, weights
#: per stored element, and positions of quantization metadata (scales, zero points).
_QUANTIZED_ARGS: dict[str, tuple[int, int, tuple[int, ...]]] = {
    "linear_int8": (1, 1, (2, 4)), "linear_int4": (1, 2, (2, 3, 5)),
    "linear_w8a8": (1, 1, (2, 3)), "embedding_int8": (0, 1, (1,)),
    "embedding_int4": (0, 2, (1, 2)), "conv_int8": (1, 1, (2,)), "conv_int4": (1, 2, (2, 3)),
    "conv_w8a8": (1, 1, (2, 3)), "expert_gather_int8": (0, 1, (1,)),
    "expert_gather_int4": (0, 2, (1, 2)),
    # int3/int2 codes are bit-packed: their weight count comes from the op (see num_params)
    "linear_lowbit": (1, 0, (2, 3, 5)), "embedding_lowbit": (0, 0, (1, 2)),
}


def _lowbit_weights(node: Node, packed: torch.Tensor) -> int:
    """Weights an int3/int2 op's packed codes stand for: rows x the unpadded row width."""
    if "embedding" in str(node.target):
        return int(packed.shape[0]) * int(node.args[6])
    x = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
    k = size_hint(x.shape[-1]) if isinstance(x, torch.Tensor) else \
        int(packed.shape[1]) * 8 // int(node.args[6])
    return int(packed.shape[0]) * k


def _output_names(program: ExportedProgram) -> list[str] | None:
    """Names from the output pytree when it is a ModelOutput/dict; else None."""
    spec = program.call_spec.out_spec
    ctx = getattr(spec, "context", None)
    if isinstance(ctx, (list, tuple)) and all(isinstance(c, str) for c in ctx):
        return list(ctx)
    return None


def refresh_meta(ir: IR) -> None:
    """:meth:`IR.refresh_meta` as a function (the name passes imported it by)."""
    ir.refresh_meta()


def _storage_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's data: two tensors with one key are the same (tied) weights."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
            t.dtype)


def _copy_tensor(value: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.nn.Parameter):
        return torch.nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
    return value.detach().clone()


def _target_text(target: Any) -> str:
    if isinstance(target, str):
        return target
    name = getattr(target, "name", None)
    if callable(name):  # OpOverload.name() -> "aten::linear"
        return str(name())
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', str(target))}"


def _fake_like(reference: Node, value: torch.Tensor) -> Any:
    """A fake tensor with ``value``'s shape/dtype in the fake mode of ``reference``'s meta."""
    ref = reference.meta.get("val")
    mode = getattr(ref, "fake_mode", None)
    if mode is None:
        return value.detach().clone()
    with mode:
        return torch.empty(value.shape, dtype=value.dtype)


def _droppable(node: Node) -> bool:
    """An unused node may go: pure, a metadata assert, or random but writing nothing."""
    if not node.is_impure():
        return True
    target = node.target
    if "_assert_tensor_metadata" in str(target):
        return True
    schema = getattr(target, "_schema", None)
    tags = getattr(target, "tags", ())
    return (schema is not None and not schema.is_mutable
            and torch.Tag.nondeterministic_seeded in tags)
