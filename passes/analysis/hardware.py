"""Target hardware numbers for the roofline cost model, read from ``backends/hardware.toml``.

Kept apart from the compilation targets (``targets.toml``): a target says how to *build* code,
a hardware entry says how fast the device *runs* it; several targets map to one device (``arm``
and ``raspberry-pi-4`` both to the Cortex-A72), and ``--hardware NAME`` picks one directly.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from slimc.errors import UsageError


@dataclass(frozen=True)
class Hardware:
    """Peak throughput per dtype, memory bandwidth and per-op overhead of one device."""

    name: str
    description: str
    peak_gflops: dict[str, float]
    mem_bandwidth_gbs: float
    op_overhead_us: float
    cores: int
    targets: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def peak_flops(self, dtype: str | None) -> float:
        """FLOP/s for arithmetic in ``dtype``; dtypes the table lacks run at the float32 rate."""
        gflops = self.peak_gflops.get(dtype or "float32") or self.peak_gflops["float32"]
        return gflops * 1e9

    @property
    def bandwidth(self) -> float:
        """Bytes per second."""
        return self.mem_bandwidth_gbs * 1e9

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "peak_gflops": self.peak_gflops, "mem_bandwidth_gbs": self.mem_bandwidth_gbs,
                "op_overhead_us": self.op_overhead_us, "cores": self.cores,
                "sources": list(self.sources), **self.extra}


@lru_cache(maxsize=1)
def hardware_table() -> dict[str, Hardware]:
    """Every device in ``hardware.toml``, by name."""
    text = resources.files("slimc.backends").joinpath("hardware.toml").read_text()
    table: dict[str, Hardware] = {}
    for name, raw in tomllib.loads(text).items():
        raw = dict(raw)
        table[name] = Hardware(
            name=name, description=raw.pop("description"),
            peak_gflops={k: float(v) for k, v in raw.pop("peak_gflops").items()},
            mem_bandwidth_gbs=float(raw.pop("mem_bandwidth_gbs")),
            op_overhead_us=float(raw.pop("op_overhead_us")), cores=int(raw.pop("cores")),
            targets=tuple(t.lower() for t in raw.pop("targets", ())),
            sources=tuple(raw.pop("sources", ())), extra=raw)
    return table


def get_hardware(name: str) -> Hardware:
    """The entry called ``name`` (or listing ``name`` among its targets)."""
    table = hardware_table()
    key = name.lower()
    if key in table:
        return table[key]
    for hw in table.values():
        if key in hw.targets:
            return hw
    if key.startswith(LEVEL_ESTIMATE):
        return level_estimate(name[len(LEVEL_ESTIMATE):])
    if key == host_estimate().name.lower():
        # The estimate for a host CPU the table does not list (what hardware_for_target gave
        # the analysis), passed on by name to the cost pass.
        return host_estimate()
    raise UsageError(f"Unknown hardware {name!r}.",
                     hint=f"Use one of {', '.join(sorted(table))} (backends/hardware.toml).")


def hardware_for_target(target: Any) -> Hardware:
    """The device a compilation target runs on: by its name, aliases, then its TVM ``mcpu``.

    ``target`` is a :class:`slimc.targets.TargetSpec` or a target name. A target that builds
    for the host (``mcpu="@host"``) maps to the entry of the host's own CPU model (LLVM's name
    for it, e.g. ``znver4``) when the table has one, else to :func:`host_estimate`: no one
    machine's numbers are anyone's default. A portable level the table does not list
    (``x86-64-v4-vnni``) maps to :func:`level_estimate`.
    """
    if isinstance(target, str):
        from slimc.targets import resolve_target

        try:
            target = resolve_target(target)
        except UsageError:
            candidates, host, level = [target], False, False
        else:
            return hardware_for_target(target)
    else:
        tvm = target.tvm if isinstance(target.tvm, dict) else {}
        mcpu = str(tvm.get("mcpu", ""))
        # Built for this machine (-mcpu=native), or for a portable level that runs on this
        # machine's architecture (x86-64-v3): priced from the level's features, not this CPU's.
        host = tvm.get("kind") == "llvm" and mcpu == "@host"
        level = tvm.get("kind") == "llvm" and not host and target.triple is not None \
            and not target.is_cross
        candidates = [target.name, *target.aliases, mcpu]
        if not isinstance(target.tvm, dict):
            candidates.append(str(target.tvm))  # a TVM tag, e.g. nvidia/nvidia-h100
        if host:
            from tvm.target import codegen

            candidates.append(codegen.llvm_get_system_cpu())
    table = hardware_table()
    for candidate in candidates:
        key = candidate.lower()
        if not key or key == "@host":
            continue
        if key in table:
            return table[key]
        for hw in table.values():
            if key in hw.targets:
                return hw
    if host:
        return host_estimate()
    if level:
        return level_estimate(target)
    raise UsageError(f"No hardware numbers for target {candidates[0]!r}.",
                     hint=f"Pick the device with --hardware NAME ({', '.join(sorted(table))}).")


def hardware_if_known(target: Any) -> Hardware | None:
    """The device of ``target``, or None when the table has no entry for it.

    For the budget search, which falls back to its size rule alone on a device it has no
    numbers for rather than stopping the compilation.
    """
    if target is None:
        return None
    try:
        return hardware_for_target(target)
    except UsageError:
        return None


#: Assumptions of :func:`host_estimate` for a CPU the table does not list.
ASSUMED_GHZ = 2.5
ASSUMED_FMA_PIPES = 2
ASSUMED_BANDWIDTH_GBS = 20.0


@lru_cache(maxsize=1)
def host_estimate() -> Hardware:
    """Roofline numbers for this machine's CPU from what LLVM knows about it (vector width,
    dot-product support) and the cores this process may use; clock, FMA pipes and memory
    bandwidth are assumed (listed in ``sources``). ``slimc analyze --measure`` replaces the
    estimates with timings."""
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu()
    return _cpu_estimate({"kind": "llvm", "mcpu": cpu}, name=f"host-{cpu}",
                         what=f"this machine's CPU ({cpu})", how=f"-mcpu={cpu}")


#: Prefix of the estimate for a portable x86 level (``estimated-x86-64-v4-vnni``), by which the
#: cost pass finds it again (:func:`get_hardware`).
LEVEL_ESTIMATE = "estimated-"


def level_estimate(target: Any) -> Hardware:
    """Roofline numbers for code built for a portable level (``x86-64-v3``, ``x86-64-v4-vnni``):
    the level's own vector width and int8 dot product, not the build machine's.

    Why: the library runs on any CPU of that level, and what it can use is what the level
    enables. Pricing ``x86-64-v4-vnni`` with an AVX2 build host's numbers gave int8 twice
    float32 instead of four times (no VNNI on the host), so the budget search found W8A8 too
    slow for a VNNI target (0.65 > 0.6, session 24). Cores are this machine's: the target does
    not say how many the device has. ``target``: a TargetSpec or a target name."""
    if isinstance(target, str):
        from slimc.targets import resolve_target

        target = resolve_target(target)
    tvm_spec = target.tvm if isinstance(target.tvm, dict) else {"kind": "llvm"}
    return _level_estimate(target.name, json.dumps(tvm_spec, sort_keys=True))


@lru_cache(maxsize=16)
def _level_estimate(name: str, tvm_json: str) -> Hardware:
    """:func:`level_estimate`, cached by the target's name and its TVM dict as JSON."""
    tvm_spec = json.loads(tvm_json)
    flags = " ".join([f"-mcpu={tvm_spec.get('mcpu', '')}", *tvm_spec.get("mattr", [])])
    return _cpu_estimate(tvm_spec, name=f"{LEVEL_ESTIMATE}{name}",
                         what=f"a CPU of level {name}", how=flags)


def _cpu_estimate(tvm_spec: dict[str, Any], name: str, what: str, how: str) -> Hardware:
    """Cores x assumed clock x FMA pipes x lanes; int8 at 4x float32 with a dot product
    (VNNI, sdot), else 2x."""
    import os

    import tvm
    from tvm.target import codegen

    from slimc.isa import simd_width_bits

    target = tvm.target.Target(tvm_spec)
    bits = simd_width_bits(target)  # not llvm_get_vector_width: 512 on AVX2-only CPUs too
    cores = max(1, len(os.sched_getaffinity(0)))
    fp32 = cores * ASSUMED_GHZ * ASSUMED_FMA_PIPES * 2 * (bits // 32)
    try:
        dot = codegen.target_has_features(["avx512vnni"], target) or \
            codegen.target_has_features(["dotprod"], target)
    except Exception:  # noqa: BLE001 - a CPU LLVM cannot describe: no dot product assumed
        dot = False
    return Hardware(
        name=name, description=f"{what}, {cores} cores, estimated",
        peak_gflops={"float32": fp32, "float16": fp32, "bfloat16": fp32,
                     "int8": fp32 * (4 if dot else 2)},
        mem_bandwidth_gbs=ASSUMED_BANDWIDTH_GBS, op_overhead_us=2.0, cores=cores,
        sources=(f"vector width {bits} bits and int8 dot product {'yes' if dot else 'no'}: "
                 f"LLVM's description of {how}",
                 f"cores: {cores} usable by this process (CPU affinity)",
                 f"assumed {ASSUMED_GHZ} GHz and {ASSUMED_FMA_PIPES} FMA pipes per core "
                 "(float32 = cores x GHz x pipes x 2 x lanes)",
                 f"assumed {ASSUMED_BANDWIDTH_GBS} GB/s memory bandwidth",
                 "no table entry for this CPU: add one to backends/hardware.toml with measured "
                 "numbers, or use slimc analyze --measure"),
        extra={"estimated": True})
