"""The ``tvm-cpu`` backend: LLVM targets through TVM Relax, slimc's CPU schedules, and either a
native run or qemu for cross targets.

It wraps the CPU pipeline that predates the backend seam (``lower.py``, ``build.py``,
``runtime.py``, ``emulation.py``, ``tuning.py``) without changing it.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimc.backend import (
    DeviceUnavailable,
    RunFailed,
    RunLimits,
    TargetDescription,
    TargetInfo,
)
from slimc.errors import UsageError
from slimc.targets import TargetSpec

#: Weight formats with CPU kernels (``slimc::*`` lowerings in ``quantized_ops.py``).
#: ``qs``: the ``-qs`` / ``-qsB`` grids (coded group scales, ``slimc::coded_scale``).
CPU_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4", "int3", "int2", "w8a8", "qs")


class TvmCpuBackend:
    name = "tvm-cpu"
    aliases = ("tvm", "llvm")
    kinds = ("llvm",)
    #: ``--generate``: the host loop (qemu for cross targets) drives prefill/decode.
    supports_generation = True
    #: Text models default to a dynamic sequence length on this backend: every CPU schedule
    #: rule handles symbolic extents (docs/shapes.md). Backends without the attribute keep the
    #: fixed default unless ``SLIMC_DEFAULT_SEQUENCE=dynamic`` asks.
    dynamic_sequence_default = True

    # -- what the target is ------------------------------------------------------------------
    def describe(self, spec: TargetSpec) -> TargetDescription:
        if spec.is_cross:
            return TargetDescription(
                compiles_to=f"shared library (.so) of {spec.triple} machine code",
                build_needs="pip only: TVM's LLVM + `python -m ziglang` as the cross linker",
                run_needs=f"an {spec.triple.split('-')[0]} Linux device with the TVM runtime",
                verified_by=f"run once under qemu-{spec.triple.split('-')[0]} with the sysroot "
                "in ~/.cache/slimc (unverified when qemu is missing)")
        return TargetDescription(
            compiles_to="shared library (.so) of host machine code (LLVM)",
            build_needs="pip only (TVM's LLVM; g++ or zig to link)",
            run_needs="this machine's CPU and the TVM runtime",
            verified_by="run once in-process and compared with the IR")

    def check(self, spec: TargetSpec) -> None:
        # everything ships in the wheels; the CPU kernels compute in fp32
        if spec.extra.get("precision", "fp32") != "fp32":
            raise UsageError(f"Target {spec.name!r}: CPU targets compute in fp32 only.",
                             hint="Drop precision=...; to store weights in half precision use "
                             "the pass quantize{weights=fp16} (or bf16).")

    def target_info(self, spec: TargetSpec) -> TargetInfo:
        from slimc.backends.tvm.int8_kernels import kernel_kind
        from slimc.backends.tvm.schedules.common import vector_bits
        from slimc.backends.tvm.schedules.winograd import RULE as WINOGRAD
        from slimc.passes.analysis.hardware import hardware_for_target

        target = spec.tvm_target()
        from tvm.target import codegen

        triple = spec.triple or str(target.attrs.get("mtriple", "")) or \
            codegen.llvm_get_system_triple()
        dot = kernel_kind(target)
        try:
            hw = hardware_for_target(spec)
        except UsageError:  # no table entry for this device: the facts LLVM knows still hold
            hw = None
        return TargetInfo(
            target=spec.name, device="cpu", arch=triple, vector_bits=vector_bits(target),
            dot_product=None if dot == "generic" else dot, formats=CPU_FORMATS,
            mem_bandwidth_gbs=hw.mem_bandwidth_gbs if hw else None,
            peak_gflops=dict(hw.peak_gflops) if hw else {}, hardware=hw.name if hw else None,
            sources=hw.sources if hw else (), winograd=WINOGRAD,
            op_overhead_us=hw.op_overhead_us if hw else None)

    # -- building ----------------------------------------------------------------------------
    def set_threads(self, threads: int | None) -> int:
        from slimc.backends.tvm.runtime import set_threads

        return set_threads(threads)

    def plan_tuning(self, spec: TargetSpec, trials: int, minutes: float | None,
                    database: str | Path | None) -> Any:
        from slimc.backends.tvm.tuning import TuningOptions

        plan = TuningOptions(trials=trials, minutes=minutes, database=database)
        plan.validate()
        if trials and spec.is_cross:
            raise UsageError(f"--tune measures kernels on this machine, which cannot run "
                             f"{spec.triple} code.", hint="Tune on the device itself (or an "
                             "identical one) and bring its database here with --tune-db PATH.")
        return plan

    def open_tuner(self, plan: Any, spec: TargetSpec, progress: Callable[[str], None]) -> Any:
        from slimc.backends.tvm.tuning import open_tuner

        return open_tuner(plan, spec.tvm_target(), progress)

    def lower(self, ir, spec: TargetSpec, converters: dict[Any, Any]) -> Any:
        from slimc.backends.tvm.lower import lower_to_relax

        return lower_to_relax(ir, converters, spec.tvm_target())

    def build(self, module: Any, spec: TargetSpec, path: Path, *, tuning: Any = None,
              keep: dict | None = None) -> Path:
        """``keep``: see :func:`~slimc.backends.tvm.build.build_library` (the per-kernel check
        of a cross artifact, :meth:`record_kernels`)."""
        from slimc.backends.tvm.build import build_library

        return build_library(module, spec, path, tuning=tuning, keep=keep)

    # -- the per-kernel check of big cross artifacts (kernel_check.py) ------------------------
    def wants_kernel_check(self, spec: TargetSpec, limits: RunLimits) -> str | None:
        """Why the whole-model emulated run is replaced by the per-kernel check (its estimated
        duration on an idle host over ``$SLIMC_KERNEL_CHECK_ABOVE_S``), or None to keep it."""
        from slimc.backends.tvm.emulation_budget import emulation_budget
        from slimc.backends.tvm.kernel_check import ENV_VAR, threshold_s

        if not spec.is_cross:
            return None
        expected = emulation_budget(limits.flops, limits.weight_bytes, override_s=1.0,
                                    load_factor=1.0).expected_s
        above = threshold_s()
        if expected <= above:
            return None
        return (f"the whole model would take ~{expected:.0f}s under the emulator "
                f"(> {above:g}s, {ENV_VAR})")

    def start_kernel_guest(self, spec: TargetSpec, threads: int | None):
        """The emulator for the per-kernel check of a ``spec`` library, started now, before
        the library is built (its start-up overlaps the build and :meth:`record_kernels`;
        :class:`~.emulation.KernelGuest`), or None when it cannot start: :meth:`run` then
        starts one itself and reports why it could not."""
        from slimc.backends.tvm.emulation import EmulationError, KernelGuest, find_emulator

        try:
            return KernelGuest(find_emulator(spec.triple), threads)
        except EmulationError:
            return None

    def record_kernels(self, keep: dict, inputs: Sequence[np.ndarray], threads: int | None):
        """The kernels kept by :meth:`build`, rebuilt for this CPU and run on ``inputs``
        (:func:`~slimc.backends.tvm.kernel_check.record_on_host`)."""
        from slimc.backends.tvm.kernel_check import record_on_host

        return record_on_host(keep["scheduled"], keep.get("weights", ()), inputs, threads)

    # -- running -----------------------------------------------------------------------------
    def load(self, library: Path, manifest: dict[str, Any], threads: int | None,
             emulate: bool = False):
        cross = manifest["target"].get("cross_triple")
        if cross:
            if not emulate:
                raise DeviceUnavailable(f"built for {cross}")
            from slimc.backends.tvm.emulation import run_emulated

            return lambda arrays: run_emulated(library, list(arrays), threads=threads)
        from slimc.backends.tvm.runtime import NativeRunner

        from slimc.isa import check_cpu

        check_cpu(manifest.get("isa"), str(library.parent))
        return NativeRunner(library, threads)

    def run(self, library: Path, spec: TargetSpec, inputs: Sequence[np.ndarray],
            threads: int | None, *, limits: RunLimits | None = None,
            entries: Sequence[tuple[str, Sequence[int]]] | None = None,
            kernels: tuple[str, str] | None = None,
            timings: dict | None = None, guest: Any = None) -> list[np.ndarray]:
        """``entries``: run these functions on these input indices instead of ``main``
        (generation artifacts: ``prefill`` and ``decode``). ``kernels``: a cross artifact's
        single kernels (:mod:`.kernel_check`); ``timings`` then receives where the emulated
        run's time went; ``guest`` (from :meth:`start_kernel_guest`) runs them when given."""
        from slimc.backends.tvm.emulation import (
            EmulationError,
            EmulationTimeout,
            EmulatorUnavailable,
        )
        from slimc.backends.tvm.runtime import run_library

        if not spec.is_cross:
            from slimc.isa import missing_features, required_isa

            missing = missing_features(required_isa(spec))
            if missing:  # running it would kill this process with SIGILL: build, don't verify
                raise DeviceUnavailable(f"this CPU lacks {', '.join(missing)}, which a "
                                        f"{spec.name} library may use")
            return run_library(library, inputs, cross_triple=None, threads=threads,
                               entries=entries)
        limits = limits or RunLimits()
        budget = _emulation_budget(limits)
        limits.budget = budget.to_json()
        emu = self.where(spec)

        def tick(elapsed: float) -> None:
            what = "kernels" if kernels else "model"
            limits.progress(f"running the {what} under {emu}: {elapsed:.0f}s of "
                            f"~{budget.expected_s:.0f}s expected (stops at {budget.limit_s:.0f}s)")

        tick(0.0)
        try:
            if guest is not None and kernels is not None:
                return guest.run(library, kernels, timeout=budget.limit_s, on_tick=tick,
                                 timings=timings)
            return run_library(library, inputs, cross_triple=spec.triple, threads=threads,
                               timeout=budget.limit_s, on_tick=tick, entries=entries,
                               **({"kernels": kernels, "timings": timings}
                                  if kernels is not None else {}))
        except EmulatorUnavailable as exc:
            raise DeviceUnavailable(str(exc)) from exc
        except EmulationTimeout as exc:
            raise RunFailed(f"the run under {emu} did not finish within its {exc.limit_s:g}s "
                            f"budget ({budget.basis})\n{_rest(exc)}", timed_out=True,
                            limit_s=exc.limit_s, budget=limits.budget) from exc
        except EmulationError as exc:
            first, rest = (str(exc).split("\n", 1) + [""])[:2]
            raise RunFailed(f"the run under {emu} failed: {first}\n{rest}", timed_out=False,
                            budget=limits.budget) from exc

    def required_isa(self, spec: TargetSpec) -> dict[str, Any] | None:
        from slimc.isa import required_isa

        return required_isa(spec)

    def where(self, spec: TargetSpec) -> str:
        if spec.is_cross:
            return f"qemu-{spec.triple.split('-')[0]}"
        return f"host ({platform.machine()})"


def _emulation_budget(limits: RunLimits):
    from slimc.backends.tvm.emulation_budget import emulation_budget

    return emulation_budget(limits.flops, limits.weight_bytes, override_s=limits.timeout_s)


def _rest(exc: Exception) -> str:
    """An emulator error's lines after the first (the guest's output tail)."""
    parts = str(exc).split("\n", 1)
    return parts[1] if len(parts) > 1 else ""
