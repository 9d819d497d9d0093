"""Instruction-set levels: what CPU an artifact needs, and whether this CPU has it.

A library built with AVX-512 instructions dies with SIGILL on an AVX2 server, at the first
kernel that uses one, with no message. slimc therefore records in the manifest the ISA level and
the CPU feature flags (spelled as Linux's ``/proc/cpuinfo`` spells them) that the target allowed
LLVM to use, and :func:`check_cpu` refuses to load an artifact on a CPU that lacks one of them.
The library itself carries the same record in an ELF section (:data:`ISA_SECTION`), so a bare
``model.so`` loaded without its manifest is refused too, not only an artifact folder.

The x86 levels are the x86-64 psABI microarchitecture levels; their feature lists come from
``archspec`` (the library Spack uses), not from a hand-kept table. The aarch64 levels are few
enough to spell out here.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from slimc.errors import UsageError

#: The ELF section that carries a library's :func:`required_isa` record (JSON). Not allocated
#: (no ``a`` flag): never mapped at run time, read from the file by :func:`library_isa`.
ISA_SECTION = ".slimc.isa"


class CpuMismatch(UsageError):
    """A library or artifact needs an instruction set (or architecture) this CPU lacks."""


#: aarch64 levels -> the /proc/cpuinfo "Features" flags they imply that codegen may use.
ARM_LEVELS: dict[str, tuple[str, ...]] = {
    "armv8-a": ("asimd",),
    "armv8.2-a": ("asimd", "asimddp"),
    "armv8.6-a": ("asimd", "asimddp", "i8mm"),
}

#: LLVM ``-mattr`` names -> /proc/cpuinfo flags, for extensions a target adds to its level.
MATTR_FLAGS: dict[str, str] = {
    "avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni", "avx512bf16": "avx512_bf16",
    "avx512vbmi": "avx512vbmi", "avx2": "avx2", "fma": "fma", "avx512f": "avx512f",
    "neon": "asimd", "dotprod": "asimddp", "i8mm": "i8mm", "bf16": "bf16", "sve": "sve",
    "fullfp16": "asimdhp",
}

#: x86 flag prefixes that name instruction-set extensions (the rest of /proc/cpuinfo's flags
#: are bugs, power management, virtualisation ...): a ``host`` artifact needs all it has.
_X86_ISA_PREFIXES = ("sse", "ssse3", "avx", "fma", "f16c", "bmi", "amx", "gfni", "vaes",
                     "vpclmulqdq", "movbe", "popcnt", "abm", "sha_ni", "adx", "aes", "pclmulqdq")
_ARM_ISA_FLAGS = ("asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve", "sve2", "fphp",
                  "asimdrdm", "asimdfhm")


def level_features(level: str) -> list[str]:
    """Feature flags a named level implies (``x86-64-v3`` -> avx2, fma, ...)."""
    if level in ARM_LEVELS:
        return list(ARM_LEVELS[level])
    if level.startswith("x86-64-v"):
        import archspec.cpu

        return sorted(archspec.cpu.TARGETS[level.replace("-", "_")].features)
    raise KeyError(level)


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """This CPU's feature flags, or None where the OS does not say (then nothing is checked)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags = set(value.split())
            if "pni" in flags:  # Linux's name for SSE3; archspec's levels say "sse3"
                flags.add("sse3")
            return flags
    return None


def host_isa_flags() -> list[str]:
    """The instruction-set extensions of this CPU (what ``-mcpu=native`` may use)."""
    flags = cpu_flags() or set()
    if host_arch() == "x86_64":
        return sorted(f for f in flags if f.startswith(_X86_ISA_PREFIXES))
    return sorted(f for f in flags if f in _ARM_ISA_FLAGS)


def simd_width_bits(target: Any) -> int:
    """Widest SIMD register (bits) LLVM may use for ``target``: 512 with AVX-512, 256 with
    AVX2/AVX, 128 for SSE and aarch64 NEON.

    Why not ``llvm_get_vector_width``: TVM answers 512 for every x86 ``-mcpu`` it is given
    without a triple -- the host target (``mcpu`` = this CPU, no ``mtriple``) on an AVX2-only
    Zen 3 or Haswell included -- so the schedules tiled for 512-bit registers and spilled
    (ResNet-50 on znver3: 1.32x ONNX Runtime's time, 0.77x once the width was right). The
    width is therefore read from the CPU's features: ``mcpu="@host"`` means this machine's CPU,
    and a target without a triple is for this machine's architecture.
    """
    from tvm.target import Target, codegen

    attrs = target.attrs
    mcpu = str(attrs.get("mcpu", "") or "")
    triple = str(attrs.get("mtriple", "") or "") or codegen.llvm_get_system_triple()
    arch = triple.split("-")[0].lower()
    if mcpu == "@host":
        mcpu = codegen.llvm_get_system_cpu()
        spec: dict[str, Any] = {"kind": "llvm", "mcpu": mcpu}
        if attrs.get("mtriple"):
            spec["mtriple"] = str(attrs["mtriple"])
        if attrs.get("mattr"):
            spec["mattr"] = [str(a) for a in attrs["mattr"]]
        target = Target(spec)
    if arch in ("x86_64", "amd64", "i386", "i686"):
        try:
            if codegen.target_has_features(["avx512f"], target):
                return 512
            return 256 if codegen.target_has_features(["avx"], target) else 128
        except Exception:  # noqa: BLE001 - a CPU LLVM cannot describe: the SSE2 baseline
            return 128
    if arch.startswith(("aarch64", "arm64", "arm", "thumb")):
        return 128  # NEON; the aarch64 schedules do not use SVE's scalable vectors
    try:
        bits = int(codegen.llvm_get_vector_width(target))
    except Exception:  # noqa: BLE001 - an unknown CPU still gets a safe 128-bit guess
        bits = 0
    return bits if bits >= 128 else 128


def required_isa(spec: Any) -> dict[str, Any]:
    """The manifest's ``isa`` entry for a :class:`~slimc.targets.TargetSpec`."""
    tvm = spec.tvm if isinstance(spec.tvm, dict) else {}
    triple = spec.triple or str(tvm.get("mtriple", "") or "")
    arch = triple.split("-")[0] if triple else host_arch()
    level = spec.extra.get("level")
    mcpu = str(tvm.get("mcpu", "") or "")
    if level == "host" or mcpu == "@host":
        import tvm as _tvm

        return {"arch": host_arch(), "level": "host", "features": host_isa_flags(),
                "cpu": _tvm.target.codegen.llvm_get_system_cpu(),
                "note": "built for the build machine's own CPU (-mcpu=native); it may not run "
                        "on other CPUs"}
    features = set(level_features(level)) if level else set()
    mattr = tvm.get("mattr") or []
    for attr in [mattr] if isinstance(mattr, str) else mattr:
        name = str(attr).lstrip("+")
        if str(attr).startswith("+") and name in MATTR_FLAGS:
            features.add(MATTR_FLAGS[name])
    return {"arch": arch, "level": level, "features": sorted(features), "cpu": mcpu or None}


def missing_features(isa: dict[str, Any] | None) -> list[str]:
    """The CPU feature flags ``isa`` (a :func:`required_isa` record) needs that this CPU lacks
    (none when the CPU's flags cannot be read)."""
    flags = cpu_flags()
    if not isa or flags is None:
        return []
    return [f for f in isa.get("features", []) if f not in flags]


def check_cpu(isa: dict[str, Any] | None, what: str) -> None:
    """Refuse (exit 2) to run ``what`` on a CPU lacking an instruction set it was built for."""
    if not isa:
        return  # artifacts from before slimc recorded ISA levels
    arch = host_arch()
    if isa.get("arch") and isa["arch"] != arch:
        raise CpuMismatch(f"{what} was built for {isa['arch']} and this machine is {arch}.",
                         hint="Run it on such a device, or recompile with a --target for "
                         "this machine (e.g. --target host).")
    missing = missing_features(isa)
    if missing:
        level = isa.get("level") or "its target"
        built = (f"this build machine's CPU ({isa.get('cpu')})" if level == "host"
                 else f"{level}")
        raise CpuMismatch(
            f"{what} was built for {built} and needs CPU features this CPU lacks: "
            f"{', '.join(missing)}. Running it would crash with an illegal instruction.",
            hint="Recompile with a portable target this CPU supports, e.g. --target x86-64-v3 "
            "(AVX2) or --target x86-64-v2 on x86, --target arm on aarch64.")


def isa_section_asm(isa: dict[str, Any]) -> str:
    """Assembler directives that put ``isa`` (a :func:`required_isa` record) into
    :data:`ISA_SECTION` of the object they are assembled into (as ``.byte`` values: no quoting
    to get wrong inside the C string literal that carries them)."""
    data = json.dumps(isa, sort_keys=True).encode()
    return (f'.pushsection {ISA_SECTION},"",%progbits\n'
            f'.byte {",".join(str(b) for b in data)}\n.popsection\n')


def library_isa(library: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The :func:`required_isa` record a slimc-built library carries (None: not an ELF file,
    or built before slimc recorded it). Reads the section headers only (pyelftools), not the
    library's weights."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(library, "rb") as f:
            section = ELFFile(f).get_section_by_name(ISA_SECTION)
            record = json.loads(section.data()) if section is not None else None
    except (OSError, ELFError, ValueError):
        return None
    return record if isinstance(record, dict) else None
