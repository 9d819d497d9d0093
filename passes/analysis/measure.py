"""Measured per-op latency: build one TVM kernel per distinct op, time it, cache the table.

The roofline in :mod:`.cost` is a model; ``slimc analyze --measure`` calibrates it against the
real thing. Every op node that does work is reduced to a *kernel key*

    op | argument signature (shapes and dtypes of activations ``X`` and weights ``W``,
         literal scalars) | output dtype

so the 36 identical linears of a 6-layer encoder are one kernel. Each missing kernel becomes a
one-op module (the node's own ATen call, weights bound as constants exactly as the compiler
binds them), which goes through slimc's own lowering (:func:`~slimc.backends.tvm.lower.
lower_to_relax`) and build (:func:`~slimc.backends.tvm.build.build_library`: the scheduled CPU
pipeline for llvm targets). All missing kernels of a model are built into *one* library (one
Relax function each), so the build and link cost is paid once. The library is timed with the
Relax VM's ``time_evaluator`` either in this process (host targets; ``TVM_NUM_THREADS``
respected through :func:`~slimc.backends.tvm.runtime.set_threads`) or on a remote device over
TVM RPC (``rpc="host:port"``: ``tvm.rpc.connect``, upload, ``load_module``).

The table is cached on disk per *target identity* (TVM target with the resolved CPU, where it
runs, thread count, TVM version): ``$SLIMC_CACHE_DIR/measured/<hash>.json`` (default
``~/.cache/slimc``), written atomically and merged with what is on disk at write time. A second
analysis of the same (or a similar) model builds nothing.

The TVM runtime sizes its thread pool once per process, on first use: measure before anything
else runs TVM code in the process if ``threads`` matters (the CLI does).

An isolated kernel is not the same as that op inside the compiled model: there, elementwise ops
fuse into the matmul before them and cost almost nothing. Per-op measurements therefore
over-state pointwise ops; the matrix ops, which dominate, are what this calibrates.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from slimc.passes.analysis.layers import op_name
from slimc.passes.analysis.op_costs import FREE_OPS
from torch.fx import Node
from torch.fx.node import map_arg

from slimc.errors import UsageError
from slimc.ir import IR, hinted_shape

#: Ops that do no arithmetic worth a kernel, or have no tensor semantics to time.
_SKIP_OPS = FREE_OPS | frozenset({
    "aten.arange", "aten.full", "aten.zeros", "aten.ones", "aten.empty", "aten.scalar_tensor",
    "aten._to_copy", "aten.to", "aten.clone", "aten.copy", "aten.new_ones", "aten.new_zeros",
    "aten.zeros_like", "aten.ones_like", "aten.full_like", "aten.empty_like",
})

#: Table file format version (bump when keys or timing method change).
FORMAT = 1


def cache_dir() -> Path:
    """``$SLIMC_CACHE_DIR`` or ``~/.cache/slimc``."""
    root = os.environ.get("SLIMC_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "slimc"


# -- kernel keys -------------------------------------------------------------------------------


def _weights(ir: IR) -> dict[str, torch.Tensor]:
    return ir.weights()


def _describe(arg: Node, weights: Mapping[str, torch.Tensor]) -> str:
    value = weights.get(arg.name)
    role = "W"
    if value is None:
        role = "X"
        value = arg.meta.get("val")
    if not isinstance(value, torch.Tensor):
        raise _Unmeasurable(f"input {arg.name} has no tensor value")
    if any(not isinstance(d, int) for d in value.shape):
        raise _Unmeasurable("symbolic shape")
    dtype = str(value.dtype).removeprefix("torch.")
    return f"{role}{list(value.shape)}:{dtype}"


class _Unmeasurable(Exception):
    pass


def kernel_key(ir: IR, node: Node, weights: Mapping[str, torch.Tensor] | None = None) -> str | None:
    """The cache key of ``node``'s kernel, or None when the node is not timed on its own."""
    op = op_name(node)
    if op in _SKIP_OPS or not op.startswith("aten."):
        return None
    if not isinstance(node.meta.get("val"), torch.Tensor):
        return None
    weights = _weights(ir) if weights is None else weights
    bits = ir.annotations.get("weight_bits", {})
    if any(a.name in bits for a in node.all_input_nodes):
        return None  # a dense fp32 kernel would not be what runs after quantization
    if not node.all_input_nodes:
        return None
    try:
        args = map_arg(node.args, lambda n: _describe(n, weights))
        kwargs = map_arg(node.kwargs, lambda n: _describe(n, weights))
    except _Unmeasurable:
        return None
    out = str(node.meta["val"].dtype).removeprefix("torch.")
    extra = f"|{kwargs!r}" if kwargs else ""
    return f"{op}|{args!r}{extra}|{out}"


def kernel_keys(ir: IR) -> dict[str, str]:
    """Node name -> kernel key, for every node that gets a measurement."""
    weights = _weights(ir)
    keys = {}
    for node in ir.nodes("call_function"):
        key = kernel_key(ir, node, weights)
        if key is not None:
            keys[node.name] = key
    return keys


# -- one-op modules ----------------------------------------------------------------------------


class _OneOp(torch.nn.Module):
    """``node.target(*args)`` with activations as inputs and weights as parameters."""

    def __init__(self, node: Node, weights: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.target = node.target
        self.inputs: list[str] = []
        self.params: dict[str, str] = {}
        for arg in node.all_input_nodes:
            if arg.name in weights:
                attr = f"w{len(self.params)}"
                self.params[arg.name] = attr
                self.register_buffer(attr, weights[arg.name].detach().clone())
            elif arg.name not in self.inputs:
                self.inputs.append(arg.name)
        self.args_template = node.args
        self.kwargs_template = dict(node.kwargs)

    def forward(self, *acts: torch.Tensor):
        env = dict(zip(self.inputs, acts, strict=True))

        def value(n: Node):
            return getattr(self, self.params[n.name]) if n.name in self.params else env[n.name]

        args = map_arg(self.args_template, value)
        kwargs = map_arg(self.kwargs_template, value)
        return self.target(*args, **kwargs)


def _example(node: Node, consumer: Node, weights: Mapping[str, torch.Tensor],
             gen: torch.Generator) -> torch.Tensor:
    val = node.meta["val"]
    shape, dtype = hinted_shape(val), val.dtype
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype)
    high = 2
    if op_name(consumer) == "aten.embedding":  # indices must be valid rows
        weight = consumer.args[0]
        high = int(weights[weight.name].shape[0]) if isinstance(weight, Node) \
            and weight.name in weights else 2
    return torch.randint(0, high, shape, generator=gen, dtype=dtype)


def one_op_module(node: Node, weights: Mapping[str, torch.Tensor]):
    """(module, example activations) computing just ``node``."""
    module = _OneOp(node, weights).eval()
    gen = torch.Generator().manual_seed(0)
    by_name = {n.name: n for n in node.all_input_nodes}
    acts = [_example(by_name[name], node, weights, gen) for name in module.inputs]
    return module, acts


def _relax_function(node: Node, weights: Mapping[str, torch.Tensor], converters=None):
    """The Relax ``main`` of the one-op module, through slimc's capture + lowering."""
    from slimc.backends.tvm.lower import lower_to_relax

    from slimc.capture import capture
    from slimc.loaders.base import LoadedModel

    module, acts = one_op_module(node, weights)
    names = [f"x{i}" for i in range(len(acts))]
    ir, _ = capture(LoadedModel(name=f"kernel_{node.name}", module=module,
                                example_inputs=dict(zip(names, acts, strict=True))))
    mod = lower_to_relax(ir, converters)
    return mod["main"], [a.numpy() for a in acts]


# -- the table ---------------------------------------------------------------------------------


@dataclass
class MeasuredTable:
    """Kernel key -> measured seconds (plus how it was measured), for one target identity."""

    identity: dict[str, Any]
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def target_hash(self) -> str:
        text = json.dumps(self.identity, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def path(self) -> Path:
        return cache_dir() / "measured" / f"{self.target_hash}.json"

    def seconds(self, key: str) -> float | None:
        entry = self.entries.get(key)
        return None if entry is None else entry.get("seconds")

    @classmethod
    def load(cls, identity: dict[str, Any]) -> MeasuredTable:
        table = cls(identity)
        try:
            data = json.loads(table.path.read_text())
        except (OSError, ValueError):
            return table
        if data.get("format") == FORMAT and data.get("identity") == identity:
            table.entries = dict(data.get("entries", {}))
        return table

    def save(self) -> Path:
        """Merge with the file's current contents (another process may have added kernels) and
        replace it atomically."""
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        on_disk = MeasuredTable.load(self.identity).entries
        merged = {**on_disk, **self.entries}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, "identity": self.identity, "entries": merged}, f,
                      indent=1, sort_keys=True)
        os.replace(tmp, path)
        self.entries = merged
        return path


@dataclass
class Measurement:
    """What one ``measure_ir`` call did, and the per-node result."""

    table: MeasuredTable
    #: node name -> kernel key (every measurable node).
    node_keys: dict[str, str]
    #: Keys built and timed by this call / found in the cache / that failed (key -> reason).
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    build_seconds: float = 0.0
    time_seconds: float = 0.0

    def node_seconds(self) -> dict[str, float]:
        """Node name -> measured seconds, for nodes whose kernel has a measurement."""
        out = {}
        for node, key in self.node_keys.items():
            seconds = self.table.seconds(key)
            if seconds is not None:
                out[node] = seconds
        return out

    def to_json(self) -> dict[str, Any]:
        return {"table": str(self.table.path), "target_hash": self.table.target_hash,
                "identity": self.table.identity, "kernels": len(set(self.node_keys.values())),
                "measured_nodes": len(self.node_seconds()), "built": len(self.built),
                "reused": len(self.reused), "failed": self.failed,
                "build_seconds": round(self.build_seconds, 2),
                "time_seconds": round(self.time_seconds, 2)}


def target_identity(spec, rpc: str | None, threads: int) -> dict[str, Any]:
    """What makes two measurements comparable: the resolved TVM target, the device, threads."""
    import tvm

    where = f"rpc://{rpc}" if rpc else f"local://{socket.gethostname()}"
    return {"target": str(spec.tvm_target()), "device": where,
            "threads": None if rpc else threads, "tvm": tvm.__version__}


def parse_rpc(rpc: str) -> tuple[str, int]:
    host, _, port = rpc.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--rpc {rpc!r} is not HOST:PORT.",
                         hint="Start `python -m tvm.exec.rpc_server --port 9090` on the device "
                         "and pass --rpc DEVICE_IP:9090.")
    return host, int(port)


# -- building and timing -----------------------------------------------------------------------


def _build(functions: dict[str, Any], spec, path: Path) -> None:
    import tvm
    from slimc.backends.tvm.build import build_library

    build_library(tvm.IRModule(functions), spec, path)


class _Device:
    """Where kernels run: this process, or a TVM RPC session."""

    def __init__(self, spec, rpc: str | None) -> None:
        import tvm

        kind = spec.tvm_target().kind.name
        self.kind = "cpu" if kind in ("llvm", "c") else kind
        self.session = None
        if rpc:
            from tvm import rpc as tvm_rpc

            host, port = parse_rpc(rpc)
            try:
                self.session = tvm_rpc.connect(host, port)
            except Exception as exc:  # noqa: BLE001 - TVMError / OSError
                raise UsageError(f"Cannot reach the TVM RPC server at {rpc}: "
                                 f"{str(exc).strip().splitlines()[-1] if str(exc) else exc}",
                                 hint="Start `python -m tvm.exec.rpc_server --host 0.0.0.0 "
                                 "--port PORT` on the device.") from None
            self.device = self.session.device(self.kind, 0)
        else:
            self.device = tvm.device(self.kind, 0)

    def load(self, library: Path):
        import tvm

        if self.session is None:
            return tvm.runtime.load_module(str(library))
        self.session.upload(str(library))
        return self.session.load_module(library.name)

    def tensor(self, array):
        import tvm

        return tvm.runtime.tensor(array, device=self.device)


def _time_library(device: _Device, library: Path, kernels: dict[str, tuple[str, list]],
                  repeat: int, min_repeat_ms: int) -> dict[str, dict[str, Any]]:
    from tvm import relax

    vm = relax.VirtualMachine(device.load(library), device.device)
    results = {}
    for fname, (key, arrays) in kernels.items():
        args = [device.tensor(a) for a in arrays]
        vm[fname](*args)  # warm up (first-touch of constants, thread pool start)
        timer = vm.time_evaluator(fname, device.device, number=1, repeat=repeat,
                                  min_repeat_ms=min_repeat_ms)
        runs = sorted(float(t) for t in timer(*args).results)
        results[key] = {"seconds": runs[len(runs) // 2], "min_seconds": runs[0],
                        "runs": len(runs), "function": fname,
                        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return results


def measure_ir(ir: IR, spec, *, rpc: str | None = None, threads: int | None = None,
               converters=None, repeat: int = 5, min_repeat_ms: int = 5,
               log: Callable[[str], None] = lambda message: None) -> Measurement:
    """Measure every kernel of ``ir`` missing from the cached table for ``spec``; see the
    module doc. Kernels TVM cannot build are recorded in ``failed`` (their nodes keep the
    roofline)."""
    from slimc.backends.tvm.runtime import set_threads

    if spec.is_cross and not rpc:
        raise UsageError(f"Cannot time kernels for {spec.name} on this machine.",
                         hint="Run `python -m tvm.exec.rpc_server --port 9090` on the device "
                         "and pass --rpc DEVICE:9090 (or analyze for the host target).")
    threads = set_threads(threads)
    table = MeasuredTable.load(target_identity(spec, rpc, threads))
    node_keys = kernel_keys(ir)
    result = Measurement(table, node_keys)
    nodes = {n.name: n for n in ir.nodes("call_function")}
    missing: dict[str, Node] = {}
    for name, key in node_keys.items():
        if table.seconds(key) is None:
            missing.setdefault(key, nodes[name])
    result.reused = sorted(set(node_keys.values()) - set(missing))
    if not missing:
        return result
    weights = _weights(ir)
    functions: dict[str, Any] = {}
    kernels: dict[str, tuple[str, list]] = {}
    start = time.perf_counter()
    for i, (key, node) in enumerate(missing.items()):
        try:
            func, arrays = _relax_function(node, weights, converters)
        except Exception as exc:  # noqa: BLE001 - export/import failures: keep the roofline
            result.failed[key] = f"lower: {type(exc).__name__}: {_first_line(exc)}"
            continue
        fname = f"kernel_{i}"
        functions[fname] = func.with_attr("global_symbol", fname)
        kernels[fname] = (key, arrays)
    log(f"building {len(functions)} kernel(s) for {spec.name}")
    device = _Device(spec, rpc)
    with tempfile.TemporaryDirectory(prefix="slimc-measure-") as tmp:
        libraries = _build_all(functions, kernels, spec, Path(tmp), result)
        result.build_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for library, subset in libraries:
            try:
                measured = _time_library(device, library, subset, repeat, min_repeat_ms)
            except Exception as exc:  # noqa: BLE001
                for key, _ in subset.values():
                    result.failed[key] = f"run: {type(exc).__name__}: {_first_line(exc)}"
                continue
            table.entries.update(measured)
            result.built.extend(measured)
        result.time_seconds = time.perf_counter() - start
    if result.built:
        table.save()
    return result


def _build_all(functions, kernels, spec, tmp: Path, result: Measurement):
    """One library for all kernels; if that fails, one per kernel (skipping the bad ones)."""
    if not functions:
        return []
    try:
        _build(functions, spec, tmp / "kernels.so")
        return [(tmp / "kernels.so", kernels)]
    except Exception:  # noqa: BLE001 - find the culprit below
        pass
    libraries = []
    for fname, func in functions.items():
        path = tmp / f"{fname}.so"
        try:
            _build({fname: func}, spec, path)
        except Exception as exc:  # noqa: BLE001
            result.failed[kernels[fname][0]] = f"build: {type(exc).__name__}: {_first_line(exc)}"
            continue
        libraries.append((path, {fname: kernels[fname]}))
    return libraries


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1].strip()[:200] if lines else ""
