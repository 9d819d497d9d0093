"""``cost``: per-node and total parameters, bytes, MACs/FLOPs and a roofline latency estimate.

Compression decisions trade accuracy for *cost on the target*, so every transform and the
search read this one analysis. The latency of a node is

    max(FLOPs / peak FLOP/s for its dtype, bytes moved / memory bandwidth) + per-op overhead

with the numbers of one device from ``backends/hardware.toml`` (chosen from the compilation
target, or by the ``hardware`` option). View-like ops cost nothing. With ``measure=true`` the
op kernels are built with TVM and timed on the target (see :mod:`.measure`; ``rpc=HOST:PORT``
for a remote device) and a node's measured time replaces its roofline estimate
(``latency_s``; the estimate stays in ``roofline_s``, ``source`` says which one is used).
Weight bytes are counted at the weight's *current* precision: its dtype, or
``ir.annotations["weight_bits"][placeholder]`` when a quantization pass has recorded fewer bits
than the storage dtype.

Arithmetic is priced by what the kernel computes in, not by how the weight is stored: a
weight-only format (int8/int4/int3/int2 weights, ``quantize{activations=none}``) dequantizes
and multiplies in float, so its FLOPs run at the float32 peak (fewer bytes help only
memory-bound ops). Only the W8A8 ops (``quantize{activations=int8}``: int8 inputs times int8
weights) run at the int8 rate, and only as fast as the target's int8 dot-product instructions
allow (:func:`int8_peak`): the table's int8 peak with VNNI / sdot / dp4a, half of it with
AVX2's two-instruction ``vpmaddubsw`` + ``vpmaddwd``, and the float32 rate on a target without
any (a generic kernel widens to int32 and is no faster than fp32). A W8A8 op also pays for the
kernel that quantizes its float32 input to the int8 codes its matmul reads
(:func:`activation_quantize_seconds`): the lowering emits one per W8A8 op.

Results are per node (keyed by node name, carrying the module path), aggregated per module path
(one ``nn.Linear``/``nn.Conv2d`` each), per weight-bearing layer (see :mod:`.layers`), per op
type, and in total.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from slimc.passes.analysis.hardware import Hardware, get_hardware, hardware_for_target
from slimc.passes.analysis.layers import op_name, weight_layers
from slimc.passes.analysis.op_costs import FREE_OPS, op_flops, tensors
from torch.fx import Node

from slimc.errors import UsageError
from slimc.ir import IR, hinted_numel
from slimc.passmanager import AnalysisPass, PassContext, PassOptions

#: slimc's ops that multiply int8 activations by int8 weights (``quantize{activations=int8}``).
W8A8_OPS = frozenset({"slimc.linear_w8a8", "slimc.conv_w8a8"})
#: slimc's gathers from packed tables: like ``aten.embedding``, they read only the rows gathered.
GATHER_OPS = frozenset({"slimc.embedding_int8", "slimc.embedding_int4",
                        "slimc.embedding_lowbit"})
#: ``dot_product`` value meaning "no target known: trust the table's int8 peak".
ANY_DOT = "table"


def int8_peak(hw: Hardware, dot_product: str | None = ANY_DOT) -> float:
    """Op/s of int8 x int8 matrix work on ``hw`` with the target's int8 dot-product
    instructions (``TargetInfo.dot_product``: ``vnni``, ``sdot``, ``dp4a``, ``avx2`` or None).

    Why not the table's int8 figure alone: it is the device's best int8 rate, which needs those
    instructions; slimc's W8A8 kernel on a target built without them (x86-64-v2, Armv8.0 such
    as the Raspberry Pi 4) widens to int32 and runs no faster than fp32 (its quantize pass
    warns), and AVX2's pair ``vpmaddubsw`` + ``vpmaddwd`` does half of VNNI's work per
    instruction. Never below the float32 rate (the kernel would not be chosen otherwise)."""
    fp32 = hw.peak_flops("float32")
    if dot_product is None:
        return fp32
    table = hw.peak_flops("int8")
    if dot_product == "avx2":
        table /= 2
    return max(table, fp32)


_SUMMED = ("params", "weight_bytes", "macs", "flops", "activation_bytes", "bytes_moved",
           "latency_s", "roofline_s")


@dataclass(frozen=True)
class NodeCost:
    """What one op costs on the chosen hardware."""

    name: str
    op: str
    module_path: str
    module_type: str
    dtype: str | None
    params: int
    weight_bytes: int
    macs: int
    flops: int
    #: Bytes of non-weight inputs read plus outputs written.
    activation_bytes: int
    #: All memory traffic: activations plus the weight bytes actually read (an embedding reads
    #: only the rows it gathers).
    bytes_moved: int
    latency_s: float
    #: ``compute``, ``memory`` or ``free`` (view ops): which roof limits the node.
    bound: str
    #: The roofline estimate (equal to ``latency_s`` unless a measurement replaced it).
    roofline_s: float = 0.0
    #: Measured kernel time on the target, when ``measure`` ran and this op has a kernel.
    measured_s: float | None = None

    @property
    def source(self) -> str:
        return "measured" if self.measured_s is not None else "roofline"


@dataclass
class CostResult:
    hardware: Hardware
    nodes: dict[str, NodeCost]
    #: What the kernel measurement did (:meth:`.measure.Measurement.to_json`), if it ran.
    measured: dict[str, Any] | None = None
    #: module path -> summed costs of the nodes whose innermost module it is.
    by_module: dict[str, dict[str, float]] = field(default_factory=dict)
    #: layer name (see :func:`weight_layers`) -> summed costs of the ops using that weight.
    by_layer: dict[str, dict[str, float]] = field(default_factory=dict)
    #: op name -> summed costs and node count.
    by_op: dict[str, dict[str, float]] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"hardware": self.hardware.to_json(), "total": self.total,
                "measured": self.measured,
                "by_op": self.by_op, "by_layer": self.by_layer, "by_module": self.by_module,
                "nodes": {k: {**asdict(v), "source": v.source} for k, v in self.nodes.items()}}


def _bits(ir: IR, name: str, value: torch.Tensor) -> float:
    recorded = ir.annotations.get("weight_bits", {}).get(name)
    return float(recorded) if recorded else value.element_size() * 8.0


def _tensor_bytes(value: Any) -> int:
    return sum(hinted_numel(t) * t.element_size() for t in tensors(value))


def node_cost(ir: IR, node: Node, weights: dict[str, torch.Tensor], hw: Hardware,
              dot_product: str | None = ANY_DOT) -> NodeCost:
    """Roofline cost of one call_function node on ``hw``; ``dot_product``: the target's int8
    dot-product instructions (:func:`int8_peak`), which price the W8A8 ops."""
    op = op_name(node)
    info = ir.node_info(node)
    params = weight_bytes = activation_bytes = 0
    for arg in node.all_input_nodes:
        if arg.name in weights:
            value = weights[arg.name]
            bits = _bits(ir, arg.name, value)
            params += value.numel() if value.is_floating_point() else 0
            weight_bytes += int(value.numel() * bits / 8)
        else:
            activation_bytes += _tensor_bytes(arg.meta.get("val"))
    activation_bytes += _tensor_bytes(node.meta.get("val"))
    macs, flops = op_flops(op, node)
    weight_read = weight_bytes
    if op == "aten.embedding":  # reads only the gathered rows
        weight_read = _tensor_bytes(node.meta.get("val"))
    elif op in GATHER_OPS:  # packed tables (and their scales): only the gathered rows too
        weight_read = _gathered_bytes(ir, node, weights)
    bytes_moved = activation_bytes + weight_read
    # weight-only formats dequantize and compute in float: only W8A8 ops are int8 arithmetic
    dtype = "int8" if op in W8A8_OPS else info.dtype
    if op in FREE_OPS:
        return NodeCost(node.name, op, info.module_path, info.module_type, dtype, params,
                        weight_bytes, 0, 0, 0, 0, 0.0, "free")
    peak = int8_peak(hw, dot_product) if op in W8A8_OPS else hw.peak_flops(dtype)
    kernel_bytes, quantize_s = bytes_moved, 0.0
    if op in W8A8_OPS:  # the int8 kernel reads 1-byte codes that a quantize kernel wrote
        elements = _tensor_elements(node.args[0])
        kernel_bytes -= 3 * elements
        quantize_s = activation_quantize_seconds(hw, elements)
        bytes_moved = kernel_bytes + 5 * elements
    compute_s = flops / peak
    memory_s = kernel_bytes / hw.bandwidth
    latency = max(compute_s, memory_s) + hw.op_overhead_us * 1e-6 + quantize_s
    return NodeCost(node.name, op, info.module_path, info.module_type, dtype, params,
                    weight_bytes, macs, flops, activation_bytes, bytes_moved, latency,
                    "compute" if compute_s >= memory_s else "memory", latency)


def activation_quantize_seconds(hw: Hardware, elements: int) -> float:
    """Roofline time of the kernel that turns a W8A8 op's float32 input into int8 codes.

    Why priced apart from the matmul: the lowering (``backends/tvm/quantized_ops.py``,
    ``quantize_codes``) emits ``round(x * in_mult)``, clip and cast as their own fused
    elementwise kernel before the dot-product kernel (fused into the producer's elementwise
    chain at best, e.g. after GELU, never into the matmul), one per W8A8 op: Q, K and V each
    quantize the same input with their own SmoothQuant multipliers. It reads 4 bytes and
    writes 1 per element (about 4 FLOPs each) and costs a kernel launch."""
    return max(4.0 * elements / hw.peak_flops("float32"), 5.0 * elements / hw.bandwidth) \
        + hw.op_overhead_us * 1e-6


def _tensor_elements(arg: Any) -> int:
    value = arg.meta.get("val") if isinstance(arg, Node) else None
    return sum(hinted_numel(t) for t in tensors(value))


def _gathered_bytes(ir: IR, node: Node, weights: dict[str, torch.Tensor]) -> int:
    """Bytes a packed-table gather (``slimc.embedding_int8`` / ``_int4`` / ``_lowbit``) reads:
    per table operand (codes, scales, zero points: all one row per vocabulary entry), its
    bytes times the share of rows gathered; the ids are the integer activation operand."""
    ids = next((a for a in node.all_input_nodes if a.name not in weights), None)
    gathered = _tensor_elements(ids) if ids is not None else 0
    total = 0
    for arg in node.all_input_nodes:
        if arg.name in weights:
            value = weights[arg.name]
            rows = max(int(value.shape[0]) if value.dim() else 1, 1)
            total += int(value.numel() * _bits(ir, arg.name, value) / 8
                         * min(gathered, rows) / rows)
    return total


def _add(into: dict[str, float], cost: NodeCost) -> None:
    for key in _SUMMED:
        into[key] = into.get(key, 0) + getattr(cost, key)
    into["nodes"] = into.get("nodes", 0) + 1


def estimate_costs(ir: IR, hw: Hardware, measured: Mapping[str, float] | None = None,
                   dot_product: str | None = ANY_DOT) -> CostResult:
    """Costs of every call_function node of ``ir`` on ``hw``, aggregated.

    ``measured`` (node name -> seconds) replaces the roofline latency of those nodes;
    ``dot_product``: the target's int8 dot-product instructions (:func:`int8_peak`).
    """
    weights = ir.weights()
    measured = measured or {}
    result = CostResult(hardware=hw, nodes={})
    by_module: dict[str, dict[str, float]] = defaultdict(dict)
    by_op: dict[str, dict[str, float]] = defaultdict(dict)
    for node in ir.nodes("call_function"):
        cost = node_cost(ir, node, weights, hw, dot_product)
        if node.name in measured and cost.bound != "free":
            cost = replace(cost, latency_s=measured[node.name], measured_s=measured[node.name])
        result.nodes[node.name] = cost
        _add(result.total, cost)
        if cost.bound != "free":
            _add(by_op[cost.op.removeprefix("aten.")], cost)
            _add(by_module[cost.module_path or "<root>"], cost)
    # Parameters counted once per tensor (a tied weight is read by two nodes).
    result.total["params"] = ir.num_params()
    result.total["weight_bytes"] = sum(
        int(v.numel() * _bits(ir, k, v) / 8) for k, v in weights.items())
    for layer in weight_layers(ir):
        entry: dict[str, float] = {}
        for op in layer.ops:
            _add(entry, result.nodes[op.name])
        value = weights[layer.weight.name]
        entry["params"] = value.numel()
        entry["weight_bytes"] = int(value.numel() * _bits(ir, layer.weight.name, value) / 8)
        entry["latency_share"] = entry["latency_s"] / max(result.total["latency_s"], 1e-30)
        result.by_layer[layer.name] = entry
    result.by_op = dict(sorted(by_op.items(), key=lambda kv: -kv[1]["latency_s"]))
    result.by_module = dict(by_module)
    return result


def target_dot_product(ctx: PassContext | None) -> str | None:
    """The compilation target's int8 dot-product instructions (the ``target-info``
    analysis), or :data:`ANY_DOT` without a target (the table's int8 peak is used)."""
    if ctx is None or ctx.target is None or ctx.analyses is None:
        return ANY_DOT
    try:
        return ctx.analyses.get("target-info").dot_product
    except Exception:  # noqa: BLE001 - a target without a backend: the table decides
        return ANY_DOT


class CostAnalysis(AnalysisPass):
    """Roofline cost per node/layer/op on the target's hardware: params, bytes, FLOPs, latency."""

    name = "cost"

    class Options(PassOptions):
        #: Entry of backends/hardware.toml; default: the device of the compilation target.
        hardware: str | None = None
        #: Build and time each op's kernel for the target (cached on disk) and prefer those
        #: times over the roofline.
        measure: bool = False
        #: ``HOST:PORT`` of a TVM RPC server on the target device (cross targets).
        rpc: str | None = None
        #: Runtime threads for local timing (default ``TVM_NUM_THREADS`` or all cores).
        threads: int | None = None

    def run(self, ir: IR, ctx: PassContext, options: PassOptions) -> CostResult:
        assert isinstance(options, CostAnalysis.Options)
        if options.hardware:
            hw = get_hardware(options.hardware)
        elif ctx.target is not None:
            hw = hardware_for_target(ctx.target)
        else:
            hw = hardware_for_target("llvm")
        dot = target_dot_product(ctx)
        if not options.measure:
            return estimate_costs(ir, hw, dot_product=dot)
        from slimc.passes.analysis.measure import measure_ir

        spec = ctx.target
        if spec is None:
            from slimc.targets import resolve_target

            spec = resolve_target("llvm")
        if options.hardware and hardware_for_target(spec).name != hw.name:
            raise UsageError(f"--measure times kernels on {spec.name}, whose device is not the "
                             f"--hardware {options.hardware!r} the roofline uses.",
                             hint="Drop --hardware, or pick the --target that runs on it.")
        from slimc.plugins import get_registry

        measurement = measure_ir(ir, spec, rpc=options.rpc, threads=options.threads,
                                 converters=get_registry().converters,
                                 log=getattr(ctx, "log", None) or (lambda message: None))
        result = estimate_costs(ir, hw, measurement.node_seconds(), dot_product=dot)
        result.measured = measurement.to_json()
        return result

