"""Target hardware numbers for the roofline cost model, read from ``backends/hardware.toml``.

Kept apart from the compilation targets (``targets.toml``): a target says how to *build* code,
a hardware entry says how fast the device *runs* it; several targets map to one device (``arm``
and ``raspberry-pi-4`` both to the Cortex-A72), and ``--hardware NAME`` picks one directly.
"""

from __future__ import annotations

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
    raise UsageError(f"Unknown hardware {name!r}.",
                     hint=f"Use one of {', '.join(sorted(table))} (backends/hardware.toml).")


def hardware_for_target(target: Any) -> Hardware:
    """The device a compilation target runs on: by its name, aliases, then its TVM ``mcpu``.

    ``target`` is a :class:`slimc.targets.TargetSpec` or a target name.
    """
    if isinstance(target, str):
        candidates = [target]
    else:
        tvm = target.tvm if isinstance(target.tvm, dict) else {}
        candidates = [target.name, *target.aliases, str(tvm.get("mcpu", ""))]
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
    raise UsageError(f"No hardware numbers for target {candidates[0]!r}.",
                     hint=f"Pick the device with --hardware NAME ({', '.join(sorted(table))}).")
