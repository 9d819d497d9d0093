"""Registers the built-in targets and TVM lowering passes through the public hooks."""

from __future__ import annotations

import tomllib
from pathlib import Path

from slimc.hookspec import hookimpl
from slimc.targets import TargetSpec

_TARGETS_FILE = Path(__file__).with_name("targets.toml")


def load_target_file(path: Path = _TARGETS_FILE) -> list[TargetSpec]:
    data = tomllib.loads(path.read_text())
    return [TargetSpec(name=name, description=entry["description"], tvm=entry["tvm"],
                       aliases=tuple(entry.get("aliases", ())), triple=entry.get("triple"),
                       backend=entry.get("backend", "tvm-cpu"),
                       extra={k: v for k, v in entry.items() if k not in _SPEC_KEYS})
            for name, entry in data.items()]


_SPEC_KEYS = {"description", "tvm", "aliases", "triple", "backend"}


@hookimpl
def slimc_register_backends():
    from slimc.backends.tvm.cpu import TvmCpuBackend
    from slimc.backends.tvm.gpu import (
        TvmCudaBackend,
        TvmMetalBackend,
        TvmOpenCLBackend,
        TvmVulkanBackend,
    )

    return [TvmCpuBackend(), TvmCudaBackend(), TvmOpenCLBackend(), TvmMetalBackend(),
            TvmVulkanBackend()]


@hookimpl
def slimc_register_targets():
    return load_target_file()


@hookimpl
def slimc_register_passes():
    from slimc.backends.tvm.legalize import LegalizeForTVM

    return [LegalizeForTVM]


@hookimpl
def slimc_register_converters():
    # Importing the lowering modules registers their (op, target kind) lowerings.
    import slimc.backends.tvm.coded_scale_ops  # noqa: F401
    import slimc.backends.tvm.gpu_quantized  # noqa: F401
    import slimc.backends.tvm.int8_conv  # noqa: F401
    import slimc.backends.tvm.lowbit_ops  # noqa: F401
    import slimc.backends.tvm.quantized_conv  # noqa: F401
    import slimc.backends.tvm.quantized_experts  # noqa: F401
    import slimc.backends.tvm.quantized_ops  # noqa: F401
    from slimc.backends.tvm.resize_scales import converters as resize_converters
    from slimc.backends.tvm.scatter_reduce import converters as scatter_converters
    from slimc.backends.tvm.shifts import converters as shift_converters
    from slimc.backends.tvm.symbolic import converters as symbolic_converters
    from slimc.backends.tvm.torch_semantics import converters as semantic_converters

    from slimc.dialect import converters

    return {**converters(), **symbolic_converters(), **semantic_converters(),
            **resize_converters(), **scatter_converters(), **shift_converters()}
