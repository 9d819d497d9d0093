"""Compilation targets: what ``--target`` names and how slimc builds and runs for it.

A :class:`TargetSpec` is data (registered by plugins through ``slimc_register_targets``); the
built-in ones come from ``backends/targets.toml``. ``--target`` may also be any TVM target tag
(``raspberry-pi/4b-aarch64``) or a JSON dict, which slimc wraps in an ad-hoc spec.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from typing import Any

from slimc.errors import UsageError
from slimc.plugins import Registry, get_registry


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    #: TVM target as a dict (TVM 0.27 wants dicts/JSON); ``mcpu="@host"`` = this machine's CPU.
    tvm: dict[str, Any] | str
    aliases: tuple[str, ...] = ()
    #: LLVM triple of a cross target; None means the host.
    triple: str | None = None
    #: Name of the registered :class:`slimc.backend.Backend` that builds and runs it.
    backend: str = "tvm-cpu"
    #: Backend-specific settings from the target's table (e.g. a GPU's ``arch``).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_cross(self) -> bool:
        return self.triple is not None and not _is_host_triple(self.triple)

    def tvm_target(self):
        """The resolved ``tvm.target.Target``."""
        import tvm

        spec = self.tvm
        if isinstance(spec, dict) and spec.get("mcpu") == "@host":
            spec = {**spec, "mcpu": tvm.target.codegen.llvm_get_system_cpu()}
        return tvm.target.Target(spec)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "aliases": list(self.aliases), "description": self.description,
                "triple": self.triple or "host", "tvm": self.tvm, "backend": self.backend}

    def get_backend(self, registry: Registry | None = None):
        """The :class:`slimc.backend.Backend` this target names."""
        from slimc.backend import get_backend

        return get_backend(self.backend, registry)


def _is_host_triple(triple: str) -> bool:
    return triple.split("-")[0] == platform.machine()


def resolve_target(name: str, registry: Registry | None = None) -> TargetSpec:
    """Find ``name`` among registered targets, else treat it as a TVM tag or JSON target."""
    registry = registry or get_registry()
    spec = registry.targets.get(name.lower())
    if spec is not None:
        return spec
    import tvm

    try:
        tvm_spec = json.loads(name) if name.lstrip().startswith("{") else name
        target = tvm.target.Target(tvm_spec)
    except Exception:  # noqa: BLE001 - anything TVM rejects is an unknown target
        names = sorted({s.name for s in registry.targets.values()})
        raise UsageError(
            f"Unknown target {name!r}.",
            hint=f"Use one of {', '.join(names)} (see `slimc targets`), a TVM target tag such as "
            "raspberry-pi/4b-aarch64, or a TVM target JSON dict like "
            '\'{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}\'.',
        ) from None
    from slimc.backend import backend_for_kind

    kind = target.kind.name
    backend = backend_for_kind(kind, registry)
    if backend is None:
        kinds = sorted({k for b in registry.backends.values() for k in b.kinds})
        raise UsageError(f"Target {name!r} is a TVM {kind} target; no installed slimc backend "
                         f"builds {kind} code.",
                         hint=f"Installed backends build {', '.join(kinds)} targets (see `slimc "
                         "targets`); a plugin adds one through slimc_register_backends.")
    triple = str(target.attrs.get("mtriple", "")) or None if kind == "llvm" else None
    exported = {k: v for k, v in target.export().items() if k not in ("host", "tag", "keys")}
    return TargetSpec(name=name, description=f"TVM target {name}", tvm=_jsonable(exported),
                      triple=triple, backend=backend.name)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    return str(value)
