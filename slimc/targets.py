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
        data = {"name": self.name, "aliases": list(self.aliases),
                "description": self.description, "triple": self.triple or "host",
                "tvm": self.tvm, "backend": self.backend}
        if "precision" in self.extra:
            data["precision"] = self.extra["precision"]
        return data

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
    base, colon, options = name.partition(":")
    if colon and "=" in options and base.lower() in registry.targets:
        return with_options(registry.targets[base.lower()], options, name)
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


def with_options(spec: TargetSpec, text: str, name: str) -> TargetSpec:
    """``cuda:arch=sm_80,max_shared_memory_per_block=98304``: ``spec`` with TVM target
    attributes replaced (integers parsed), e.g. another GPU architecture."""
    import dataclasses

    import tvm

    from slimc.precision import TARGET_OPTIONS, check_precision

    updated = dict(spec.tvm) if isinstance(spec.tvm, dict) else _exported(
        tvm.target.Target(spec.tvm))
    extra = dict(spec.extra)
    for item in text.split(","):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise UsageError(f"Target option {item!r} in {name!r} is not KEY=VALUE.",
                             hint="Write e.g. --target cuda:arch=sm_80 or cuda:precision=fp32.")
        if key in TARGET_OPTIONS:  # slimc's own options (precision), not TVM attributes
            extra[key] = check_precision(value, name)
            continue
        updated[key] = int(value) if value.lstrip("-").isdigit() else value
    try:
        tvm.target.Target(updated)
    except Exception as exc:  # noqa: BLE001 - TVM names the attribute it rejects
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        raise UsageError(f"TVM rejects target {name!r}: {lines[-1] if lines else exc}",
                         hint=f"Use attributes of a TVM {updated.get('kind')} target, e.g. "
                         "arch=sm_80 for cuda.") from None
    return dataclasses.replace(spec, name=name, tvm=updated, aliases=(), extra=extra)


def _exported(target) -> dict[str, Any]:
    """A TVM target as a JSON-able dict (its host too), without the tag name."""
    data = {k: v for k, v in target.export().items() if k not in ("tag", "host")}
    data = _jsonable(data)
    if target.host is not None:
        data["host"] = _exported(target.host)
    return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    return str(value)
