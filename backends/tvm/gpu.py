"""GPU backends through TVM: CUDA (datacenter + Jetson), OpenCL (Mali, Adreno), Metal, Vulkan.

Every kernel is scheduled for the GPU by dlight (TVM's default GPU rules: Matmul, GEMV,
Reduction, GeneralReduction, Fallback) and then checked by :func:`check_gpu_kernels`: each
PrimFunc's loops must sit under ``blockIdx``/``threadIdx`` bindings and its shared memory must
fit the target's per-block limit (TVM's ``verify_gpu_code``), so a kernel dlight could not
schedule is a build error here, not a hang or a crash on the device.

What each target compiles to, and what it needs, is in ``describe`` (``slimc targets``).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from slimc.backends.tvm.script_frames import memoised_frame_modules

from slimc.backend import DeviceUnavailable, TargetDescription, TargetInfo
from slimc.errors import LoweringError, UsageError
from slimc.targets import TargetSpec

#: Weight formats with GPU lowerings (``slimc::*`` ops, see ``gpu_quantized.py``).
GPU_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4", "w8a8")

#: File next to a CUDA artifact's library: the CUDA C++ its cubin was compiled from (not
#: needed to run; it shows what the kernels do).
CUDA_SOURCE = "kernels.cu"

#: Vector width a GPU kernel wants channel counts to be a multiple of: one fp16 tensor-core
#: operand row (mma m16n8k16: 16 halves = 256 bits), i.e. 8 fp32 / 16 fp16 channels.
GPU_VECTOR_BITS = 256


def gpu_pipeline(target, *, matmul: bool = True):
    """The Relax pipeline for a GPU target: TVM's per-kind dispatch, lowering and finalizing
    passes around slimc's legalize + dlight step and :func:`check_gpu_kernels`.

    ``matmul=False`` leaves out ``dl.gpu.Matmul`` (Metal: its simdgroup tensorization crashes
    TVM 0.27 on Linux); GEMV/Reduction/Fallback still schedule every kernel.
    """
    import tvm
    from tvm.relax.backend import gpu_generic
    from tvm.relax.backend.cuda import pipeline as cuda

    family = cuda if target.kind.name == "cuda" else gpu_generic

    @tvm.transform.module_pass(opt_level=0, name="slimc.CheckGPUKernels")
    def check(mod, _ctx):
        check_gpu_kernels(mod, target)
        return mod

    @tvm.transform.module_pass(opt_level=0, name="slimc.GPUPipeline")
    def pipeline(mod, _ctx):
        with target:  # TVM's adreno passes read Target.current() when created
            if "adreno" in target.keys:
                from tvm.relax.backend.adreno import pipeline as adreno

                legalize = adreno.legalize_passes(target)
            else:
                legalize = schedule_passes(target, matmul=matmul)
            seq = tvm.transform.Sequential(
                family.library_dispatch_passes(target) + legalize + [check]
                + family.dataflow_lower_passes(target) + family.finalize_passes(target))
            return seq(mod)

    return pipeline


def schedule_passes(target, *, matmul: bool = True) -> list:
    """Legalize, fuse and schedule every kernel with dlight's GPU rules."""
    from tvm import relax
    from tvm.s_tir import dlight as dl

    from .schedules.broadcast_weights import fold_broadcast_weights

    rules = [tensor_core_matmul()] if matmul else []
    rules += [dl.gpu.GEMV(), long_reductions_only(dl.gpu.Reduction()),
              long_reductions_only(dl.gpu.GeneralReduction())]
    rules = [falling_through(rule) for rule in rules] + [dl.gpu.Fallback()]
    return [fold_broadcast_weights, relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR(), dl.ApplyDefaultSchedule(*rules)]


#: Reductions at most this long (per output) run serially in one thread per output.
SHORT_REDUCTION = 64


def long_reductions_only(rule):
    """``rule`` (a dlight reduction rule), declining kernels whose every reduction is at most
    :data:`SHORT_REDUCTION` long, which ``Fallback`` then runs as one thread per output.

    Why: dlight's reduction rules split each output's reduction across the threads of a block.
    For a 3 x 3 depthwise conv that is 9 products spread over a warp, per output: MobileNetV2's
    depthwise convs took 2-3 ms each at batch 8 on an H200, most of the model's 16 ms
    (benchmarks/results/gpu26/run3_trace.json), where one thread per output reads 9 inputs."""
    from tvm.s_tir import dlight as dl

    class LongReductionsOnly(dl.ScheduleRule):
        def apply(self, func, target, tunable):  # noqa: D102 - dlight's hook
            longest = _longest_reduction(func)
            if longest is not None and longest <= SHORT_REDUCTION:
                return None
            return rule.apply(func, target, tunable)

        def __repr__(self) -> str:
            return f"long_reductions_only({rule!r})"

    return LongReductionsOnly()


def _longest_reduction(func) -> int | None:
    """The largest product of reduction-axis extents over ``func``'s blocks (None: no block
    reduces, or an extent is symbolic)."""
    import tvm_ffi
    from tvm import s_tir, tirx

    products: list[int | None] = []

    def visit(block) -> None:
        product, reduces = 1, False
        for var in block.iter_vars:
            if var.iter_type == tirx.IterVar.CommReduce:
                reduces = True
                extent = var.dom.extent
                if not isinstance(extent, tirx.IntImm):
                    products.append(None)
                    return
                product *= int(extent.value)
        if reduces:
            products.append(product)

    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, visit)], order="post")
    if not products or None in products:
        return None
    return max(products)


def falling_through(rule):
    """``rule``, passing a kernel it matches but fails to schedule on to the next rule.

    Why: dlight's ``ApplyDefaultSchedule`` tries its rules in order and stops the whole build
    when one *raises* instead of declining (returning None). The Matmul rule raised ("There
    are some consumers of the cache-write stage that are not properly inlined") on a conv whose
    fused epilogue ended in a ``pad`` -- HF MobileNetV2's "same" padding -- so such models did
    not build for any CUDA target. Those pads are now folded into the convs
    (``pad_folding.py``); for any other kernel a rule raises on, the next rules (GEMV,
    reductions, then ``Fallback``, which schedules any kernel) take it instead of the build
    failing."""
    from tvm.s_tir import dlight as dl

    class FallingThrough(dl.ScheduleRule):
        def apply(self, func, target, tunable):  # noqa: D102 - dlight's hook
            try:
                return rule.apply(func, target, tunable)
            except Exception:  # noqa: BLE001 - TVM raises many kinds; the next rule decides
                return None

        def __repr__(self) -> str:
            return f"falling_through({rule!r})"

    return FallingThrough()


def tensor_core_matmul():
    """A dlight Matmul rule instance that also tensorizes for arch-specific ``sm_XXa``."""
    from tvm.s_tir import dlight as dl

    class TensorCoreMatmul(dl.gpu.Matmul):
        """dlight's Matmul rule, seeing ``sm_90a`` (H100/H200 tags) as ``sm_90``.

        dlight picks its tensor-core (WMMA) schedule for fp16 operands only when the target's
        arch parses as ``sm_<digits>`` >= 70; the arch-specific ``sm_90a`` does not parse, so
        fp16 matmuls for the H100 tag fell back to SIMT FMAs. The schedule is the same code
        either way (the cubin is still compiled for ``sm_90a``)."""

        def apply(self, func, target, tunable):
            import tvm

            arch = str(target.attrs.get("arch", "")) if target.kind.name == "cuda" else ""
            if arch.startswith("sm_") and arch[-1].isalpha() and arch[3:-1].isdigit():
                target = tvm.target.Target({**target.export(), "arch": arch[:-1]})
            return super().apply(func, target, tunable)

    return TensorCoreMatmul()


def schedule_for_gpu(mod, target, *, matmul: bool = True):
    """``mod`` after :func:`schedule_passes` (what tests and ``--save-ir`` inspect)."""
    import tvm

    with target:
        return tvm.transform.Sequential(schedule_passes(target, matmul=matmul))(mod)


def unbound_loops(func) -> list[str]:
    """Loops of ``func`` that compute outside every GPU thread binding (each would execute
    once per launch on one thread, or on the host: a kernel dlight did not schedule).

    A loop counts when a store runs in it outside any binding. A host loop whose body only
    launches bound kernels is fine: TVM's GPU sort/top-k (``topi.gpu.topk``) runs its merge
    passes as such a loop, one kernel launch per pass."""
    from tvm import tirx

    found: list[str] = []

    def visit(stmt, bound: bool, loops: tuple[str, ...]) -> None:
        if isinstance(stmt, tirx.For):
            is_binding = stmt.kind == tirx.ForKind.THREAD_BINDING
            inner = loops if bound or is_binding else (*loops, str(stmt.loop_var))
            visit(stmt.body, bound or is_binding, inner)
        elif isinstance(stmt, tirx.BufferStore):
            if not bound:
                found.extend(name for name in loops if name not in found)
        elif isinstance(stmt, tirx.AttrStmt):
            visit(stmt.body, bound or stmt.attr_key == "thread_extent", loops)
        elif isinstance(stmt, tirx.SeqStmt):
            for s in stmt.seq:
                visit(s, bound, loops)
        elif hasattr(stmt, "body") and isinstance(stmt.body, tirx.Stmt):
            visit(stmt.body, bound, loops)
            if getattr(stmt, "init", None) is not None:
                visit(stmt.init, bound, loops)
        elif isinstance(stmt, tirx.IfThenElse):
            visit(stmt.then_case, bound, loops)
            if stmt.else_case is not None:
                visit(stmt.else_case, bound, loops)
        elif hasattr(stmt, "block"):  # SBlockRealize
            visit(stmt.block, bound, loops)

    visit(func.body, False, ())
    return found


def check_gpu_kernels(mod, target) -> dict[str, dict[str, int | None]]:
    """Raise :class:`LoweringError` unless every PrimFunc of ``mod`` is fully bound to GPU
    threads and within the target's shared-memory and threads-per-block limits; returns the
    shared memory each kernel allocates."""
    from tvm import tirx
    from tvm.s_tir import analysis

    limits = {"max_shared_memory_per_block": int(target.attrs["max_shared_memory_per_block"]),
              "max_threads_per_block": int(target.attrs["max_num_threads"])}
    report: dict[str, dict[str, int | None]] = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        name = gvar.name_hint
        loops = unbound_loops(func)
        if loops:  # the hint comes from build(), which reports every TVM build failure
            raise LoweringError(f"GPU kernel {name} has loops not bound to GPU threads "
                                f"({', '.join(loops[:4])}); dlight could not schedule it.")
        try:
            allocated = analysis.calculate_allocated_bytes(func)
            shared = int(sum(v for scope, v in _scopes(allocated) if scope.startswith("shared")))
            fits = analysis.verify_gpu_code(func, limits)
        except Exception:  # noqa: BLE001 - TVM's analyses need constant extents
            # a kernel over a symbolic extent (TVM's own GPU top-k/sort from DispatchSortScan,
            # written generic in the row count) cannot be sized here; TVM launched it as written
            report[name] = {"shared_bytes": None}
            continue
        if shared > limits["max_shared_memory_per_block"] or not fits:
            raise LoweringError(f"GPU kernel {name} needs {shared} bytes of shared memory or "
                                "more threads than the target allows per block "
                                f"({limits}).")
        report[name] = {"shared_bytes": shared}
    return report


def _scopes(allocated) -> list[tuple[str, int]]:
    items = []
    for value in allocated.values():
        if hasattr(value, "items"):
            items.extend((str(k), int(v)) for k, v in value.items())
    return items


class _TvmGpuBackend:
    """What the TVM GPU backends share; subclasses fill in the device specifics."""

    name = "tvm-gpu"
    aliases: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    #: dlight's Matmul rule (off where it crashes TVM).
    matmul_rule = True
    #: TVM device name for running (``tvm.cuda``...), None when slimc cannot run it here.
    device_kind: str | None = None
    #: Arithmetic precision when the target does not say (``NAME:precision=...``).
    default_precision = "fp32"
    #: Precisions this backend lowers (fp16/bf16 need half-precision codegen in TVM's backend).
    precisions: tuple[str, ...] = ("fp32",)

    def precision(self, spec: TargetSpec) -> str:
        """The target's arithmetic precision (see :mod:`slimc.precision`)."""
        return str(spec.extra.get("precision") or self.default_precision)

    def describe(self, spec: TargetSpec) -> TargetDescription:
        raise NotImplementedError

    def check(self, spec: TargetSpec) -> None:
        self._check_precision(spec)

    def _check_precision(self, spec: TargetSpec) -> None:
        precision = self.precision(spec)
        if precision not in self.precisions:
            raise UsageError(f"Target {spec.name!r}: the {self.name} backend computes in "
                             f"{' or '.join(self.precisions)}, not {precision}.",
                             hint="Drop precision=...; to store weights in half precision use "
                             "the pass quantize{weights=fp16} (or bf16).")

    def target_info(self, spec: TargetSpec) -> TargetInfo:
        target = spec.tvm_target()
        hw = _hardware(spec)
        return TargetInfo(
            target=spec.name, device="gpu", arch=str(target.attrs.get("arch", target.kind.name)),
            vector_bits=GPU_VECTOR_BITS, dot_product=self._dot_product(target),
            formats=GPU_FORMATS, mem_bandwidth_gbs=hw.mem_bandwidth_gbs if hw else None,
            peak_gflops=dict(hw.peak_gflops) if hw else {}, hardware=hw.name if hw else None,
            sources=hw.sources if hw else (), precision=self.precision(spec))

    def _dot_product(self, target) -> str | None:
        return None

    def set_threads(self, threads: int | None) -> int:
        from slimc.backends.tvm.runtime import set_threads

        return set_threads(threads)

    def plan_tuning(self, spec: TargetSpec, trials: int, minutes: float | None,
                    database: str | Path | None) -> Any:
        if trials:
            raise UsageError(
                f"--tune is not available for GPU targets ({spec.name}): MetaSchedule tunes a "
                "kernel by compiling candidate schedules and timing each one on the device "
                "itself, and slimc's GPU backends have no way to measure on a GPU yet (neither "
                "a local one nor one behind --rpc). Without tuning every kernel gets dlight's "
                "default GPU schedule (tensor-core WMMA for fp16 matmuls on sm_70+, GEMV and "
                "reduction rules elsewhere), which is what an untuned TVM build uses.",
                hint="Drop --tune (and --tune-minutes/--tune-db) for GPU targets; to tune CPU "
                "kernels, compile for an llvm/x86/arm target with --tune N.")
        return None

    def open_tuner(self, plan: Any, spec: TargetSpec, progress: Callable[[str], None]) -> Any:
        return None

    def lower(self, ir, spec: TargetSpec, converters: dict[Any, Any]) -> Any:
        """Import ``ir`` with the quantized-op kernels in the target's precision, then convert
        the rest with TVM's ``ToMixedPrecision`` (``mixed_precision.py``)."""
        from slimc.backends.tvm.lower import lower_to_relax
        from slimc.backends.tvm.mixed_precision import computing_in, to_precision
        from slimc.backends.tvm.pad_folding import fold_pads_into_convs

        precision = self.precision(spec)
        with computing_in(precision):
            mod = lower_to_relax(ir, converters, spec.tvm_target())
        return to_precision(fold_pads_into_convs(mod), precision)

    @memoised_frame_modules()
    def host_numerics(self, module: Any, spec: TargetSpec, inputs: Sequence[np.ndarray],
                      entries: Sequence[tuple[str, Sequence[int]]] | None = None,
                      threads: int | None = None) -> list[np.ndarray]:
        """Run ``module`` (the lowered module :meth:`build` compiled for the GPU: the same
        fp16/bf16 casts and fp32 accumulators) built for this machine's CPU: the artifact's
        arithmetic, checked without the device. Element-wise fp16/bf16 ops round per op
        as on the GPU; summation order and fused multiply-adds differ (far below the
        precision tolerance)."""
        import tempfile

        import tvm
        from slimc.backends.tvm.runtime import NativeRunner

        with tempfile.TemporaryDirectory(prefix="slimc-host-numerics-") as tmp:
            library = Path(tmp) / "host.so"
            with tvm.transform.PassContext(opt_level=3):
                tvm.compile(module, target="llvm").export_library(str(library))
            runner = NativeRunner(library, threads)
            return _run_entries(runner, inputs, entries)

    @memoised_frame_modules()
    def build(self, module: Any, spec: TargetSpec, path: Path, *, tuning: Any = None) -> Path:
        import tvm
        from tvm import relax

        self.check(spec)
        target = spec.tvm_target()
        try:
            with tvm.transform.PassContext(opt_level=3):
                executable = relax.build(module, target=target,
                                         relax_pipeline=gpu_pipeline(
                                             target, matmul=self.matmul_rule))
        except LoweringError:
            raise
        except Exception as exc:  # noqa: BLE001
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            raise LoweringError(
                f"TVM could not build the model for {spec.name}: {type(exc).__name__}: "
                f"{lines[-1].strip() if lines else ''}",
                hint="Please report it with the model; `slimc compile --save-ir` writes the IR.",
            ) from exc
        return self._export(executable, spec, target, path)

    def _export(self, executable, spec: TargetSpec, target, path: Path) -> Path:
        executable.export_library(str(path), **self._link_options(spec, target))
        return path

    def _link_options(self, spec: TargetSpec, target) -> dict[str, Any]:
        """Host code links like a CPU target: natively, or with zig for a cross host."""
        host_triple = str(target.host.attrs.get("mtriple", "")) if target.host else ""
        if host_triple and host_triple.split("-")[0] != platform.machine():
            from slimc.backends.tvm.cross_link import zig_cross_compiler

            return {"fcompile": zig_cross_compiler(host_triple)}
        return {}

    def _device(self):
        import tvm
        from slimc.backends.tvm.device_runtime import load_device_runtime

        if self.device_kind is None:
            return None
        load_device_runtime(self.device_kind)  # a runtime-only TVM does not load it itself
        try:
            device = tvm.device(self.device_kind, 0)
            return device if device.exist else None
        except Exception:  # noqa: BLE001 - no runtime/driver for this device kind
            return None

    def load(self, library: Path, manifest: dict[str, Any], threads: int | None,
             emulate: bool = False):
        device = self._device()
        if device is None:
            raise DeviceUnavailable(self.no_device_reason())
        from slimc.backends.tvm.runtime import NativeRunner

        return NativeRunner(library, threads, device=device)

    def no_device_reason(self) -> str:
        return f"no {self.device_kind or self.kinds[0]} device on this machine"

    def run(self, library: Path, spec: TargetSpec, inputs: Sequence[np.ndarray],
            threads: int | None, *, limits=None,
            entries: Sequence[tuple[str, Sequence[int]]] | None = None) -> list[np.ndarray]:
        """Run once on the device; ``entries`` (generation artifacts): run each named function
        on the inputs at its indices and concatenate the outputs, like the CPU backend."""
        runner = self.load(library, {"target": spec.to_json()}, threads)
        return _run_entries(runner, inputs, entries)

    def required_isa(self, spec: TargetSpec) -> dict[str, Any] | None:
        return None  # the device's requirement is the target's arch (manifest target.tvm)

    def where(self, spec: TargetSpec) -> str:
        device = self._device()
        name = getattr(device, "device_name", None) if device is not None else None
        return f"{self.device_kind}:0 ({name})" if name else f"{self.device_kind}:0"


class TvmCudaBackend(_TvmGpuBackend):
    name = "tvm-cuda"
    kinds = ("cuda",)
    device_kind = "cuda"
    #: ``--generate``: the host loop keeps the KV cache on the GPU (generation/loop.py).
    supports_generation = True
    #: Every GPU CUDA 13 compiles for (sm_75+) has fp16 tensor cores; fp16 keeps 11 bits and
    #: the build checks the numerics on the host (``host_numerics``) against the fp32 IR.
    default_precision = "fp16"
    precisions = ("fp16", "bf16", "fp32")

    def describe(self, spec: TargetSpec) -> TargetDescription:
        arch = _arch(spec)
        precision = self.precision(spec)
        math = ("fp32 arithmetic" if precision == "fp32" else
                f"{precision} activations and arithmetic with fp32 accumulation (tensor cores; "
                "softmax and norm reductions in fp32)")
        return TargetDescription(
            compiles_to=f"shared library (.so): host code for {_host(spec)} + a cubin "
            f"(CUDA ELF for {arch}) per module; nothing is compiled at load time; {math} "
            "(precision=fp16 default, bf16 on sm_80+, fp32 via e.g. cuda:precision=fp32)",
            build_needs="pip install 'slimc[cuda]' (nvidia-cuda-nvcc wheel; no GPU needed)",
            run_needs=f"an NVIDIA GPU of compute capability {arch} with its driver (libcuda) "
            "and the TVM CUDA runtime",
            verified_by="run once on cuda:0 and compared with the IR when a GPU is present; "
            "otherwise written unverified (\"built, not verified: no CUDA device\") after the "
            "same fp16/bf16 module, built for the host CPU, matched the fp32 IR")

    def check(self, spec: TargetSpec) -> None:
        from slimc.backends.tvm.cuda_binary import require_nvcc

        require_nvcc()
        self._check_precision(spec)
        arch = _arch(spec)
        digits = "".join(c for c in arch if c.isdigit())
        if not digits or int(digits) < 75:
            raise UsageError(f"CUDA 13's nvcc cannot compile for {arch}.",
                             hint="Use a target of compute capability 7.5 or newer "
                             "(sm_75+; e.g. --target cuda -> sm_90).")
        if self.precision(spec) == "bf16" and int(digits) < 80:
            raise UsageError(f"{arch} has no bf16 arithmetic (it came with Ampere, sm_80).",
                             hint=f"Use {spec.name.split(':')[0]}:precision=fp16 (or fp32) "
                             "for this GPU.")

    def _dot_product(self, target) -> str | None:
        return "dp4a"  # every sm_61+ GPU has DP4A (int8 x4 dot product into int32)

    def _export(self, executable, spec: TargetSpec, target, path: Path) -> Path:
        from slimc.backends.tvm.cuda_binary import cubin_packer

        source = path.with_name(CUDA_SOURCE)
        executable.export_library(str(path), fpack_imports=cubin_packer(target, source),
                                  **self._link_options(spec, target))
        return path

    def no_device_reason(self) -> str:
        return "built, not verified: no CUDA device"


class TvmOpenCLBackend(_TvmGpuBackend):
    name = "tvm-opencl"
    kinds = ("opencl",)
    device_kind = "opencl"

    def describe(self, spec: TargetSpec) -> TargetDescription:
        target = spec.tvm_target()
        flavour = "Adreno (TVM's adreno pipeline)" if "adreno" in target.keys else (
            "Mali" if "mali" in target.keys else "generic")
        return TargetDescription(
            compiles_to=f"shared library (.so): host code for {_host(spec)} + OpenCL C kernel "
            f"source ({flavour}), which the device's OpenCL driver compiles when loaded",
            build_needs="pip only (TVM's OpenCL codegen; zig links an aarch64 host)",
            run_needs="the device's OpenCL driver (libOpenCL) and a TVM runtime built with "
            "OpenCL (the pip wheel's is not)",
            verified_by="not run here (no OpenCL runtime in the TVM wheel): the build checks "
            "every kernel is bound to GPU threads; the artifact is written unverified")


class TvmMetalBackend(_TvmGpuBackend):
    name = "tvm-metal"
    kinds = ("metal",)
    device_kind = "metal"
    matmul_rule = False  # dl.gpu.Matmul's simdgroup tensorization segfaults TVM 0.27 on Linux

    def describe(self, spec: TargetSpec) -> TargetDescription:
        return TargetDescription(
            compiles_to="tar of arm64 Mach-O objects (host code + Metal shader source); link "
            "on a Mac: `tar xf model.tar && xcrun clang++ -dynamiclib *.o -o model.dylib "
            "-framework Metal -framework Foundation -undefined dynamic_lookup`",
            build_needs="pip only (LLVM emits the arm64-apple-macos objects); the final link "
            "needs Xcode's clang on macOS",
            run_needs="an Apple-silicon Mac with a TVM runtime built with Metal",
            verified_by="not run here; the build checks every kernel is bound to GPU threads "
            "(dlight GEMV/Reduction/Fallback; no Matmul rule, see the note in gpu.py)")

    def _export(self, executable, spec: TargetSpec, target, path: Path) -> Path:
        tar = path.with_suffix(".tar")
        executable.export_library(str(tar))
        return tar


class TvmVulkanBackend(_TvmGpuBackend):
    name = "tvm-vulkan"
    kinds = ("vulkan",)
    device_kind = "vulkan"
    REASON = ("the apache-tvm 0.27 wheel has no SPIR-V code generator (target.build.vulkan is "
              "missing); it needs TVM built from source with USE_VULKAN=ON (Vulkan SDK, "
              "SPIRV-Tools), which a plugin could provide through slimc_register_backends")

    def describe(self, spec: TargetSpec) -> TargetDescription:
        return TargetDescription(
            compiles_to="(would be) shared library with SPIR-V kernels", build_needs=(
                "TVM with USE_VULKAN=ON"), run_needs="a Vulkan 1.1+ driver",
            verified_by="-", available=False, reason=self.REASON)

    def check(self, spec: TargetSpec) -> None:
        raise UsageError(f"Target {spec.name} is not available: {self.REASON}.",
                         hint="Use --target opencl (Mali/Adreno), metal or cuda instead.")


def _arch(spec: TargetSpec) -> str:
    return str(spec.tvm_target().attrs.get("arch", "sm_90"))


def _host(spec: TargetSpec) -> str:
    target = spec.tvm_target()
    return str(target.host.attrs.get("mtriple", "")) if target.host else platform.machine()


def _hardware(spec: TargetSpec):
    from slimc.passes.analysis.hardware import hardware_for_target

    try:
        return hardware_for_target(spec)
    except UsageError:
        return None


def _run_entries(runner, inputs: Sequence[np.ndarray],
                 entries: Sequence[tuple[str, Sequence[int]]] | None) -> list[np.ndarray]:
    """Run the model once, or (generation artifacts) each named function on the inputs at its
    indices, concatenating the outputs like the CPU backend."""
    if not entries:
        return runner(inputs)
    outputs: list[np.ndarray] = []
    for name, indices in entries:
        outputs += runner([inputs[i] for i in indices], function=name)
    return outputs
