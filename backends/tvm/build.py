"""Build a Relax module into a shared library for a target, linked natively or with zig."""

from __future__ import annotations

import functools
import shutil
import sys
from pathlib import Path

from slimc.backends.tvm.blob_pack import incbin_supported, pack_imports_incbin
from slimc.backends.tvm.build_failure import failing_op, op_signatures
from slimc.backends.tvm.cross_link import zig_cross_compiler
from slimc.backends.tvm.lower import UnsupportedOpError
from slimc.backends.tvm.parallel_build import build_jobs, relax_build
from slimc.backends.tvm.script_frames import memoised_frame_modules
from slimc.backends.tvm.streamed_constants import StreamedConstants

from slimc import interrupts
from slimc.errors import LoweringError
from slimc.isa import required_isa
from slimc.targets import TargetSpec


@memoised_frame_modules()
def build_library(mod, spec: TargetSpec, path: Path, *, tuning=None,
                  keep: dict | None = None) -> Path:
    """Compile ``mod`` for ``spec`` and write the shared library to ``path``; ``mod``'s Relax
    functions (and the weights they bind) are released once built.

    CPU targets go through :func:`slimc.backends.tvm.schedules.cpu_pipeline`, which schedules
    every kernel (parallel, vectorized, register-tiled) instead of TVM's naive default loops.
    ``tuning`` (a :class:`slimc.backends.tvm.tuning.Tuner`) runs after fusion: it tunes and/or
    applies MetaSchedule records, and slimc's schedules handle the kernels it leaves.
    ``keep`` (a dict) receives ``"scheduled"``, the module the pipeline produced (scheduled
    kernels, weights still bound as constants: no copy), and ``"weights"``, the streamed
    weights in their library order: the per-kernel check of a cross artifact
    (:mod:`.kernel_check`) rebuilds those very kernels for the host.
    """
    import tvm

    target = spec.tvm_target()
    pipeline = _pipeline(target, tuning)
    # The weights go to a section of the library, outside TVM's serialized executable, and
    # are read there in place at load time (see streamed_constants); needs our own pipeline
    # (llvm targets) and the .incbin packing.
    streamed = StreamedConstants() if callable(pipeline) and incbin_supported() else None
    if callable(pipeline):
        pipeline = _consuming(pipeline)
        if keep is not None:
            pipeline = _keeping(pipeline, keep)
    signatures = op_signatures(mod)  # types only: which op failed, if the build fails
    try:
        # slimc's own (llvm) pipeline: the kernels are built on the -j threads
        jobs = build_jobs() if callable(pipeline) else 1
        with tvm.transform.PassContext(opt_level=3):
            executable = relax_build(mod, target, (
                streamed.wrap_pipeline(pipeline) if streamed else pipeline), jobs)
    except Exception as exc:  # noqa: BLE001
        interrupts.check()  # a swallowed Ctrl-C/SIGTERM stops here
        # memory or disk trouble is not an op's fault: no search (it would only add to it)
        culprit = None if isinstance(exc, (MemoryError, OSError)) \
            else failing_op(signatures, target)
        if culprit is not None:
            sig, error = culprit
            raise UnsupportedOpError(
                f"TVM {tvm.__version__} cannot build the op {sig.describe()} that the model "
                f"uses, for {spec.name}: it fails on its own ({error[:300]}).",
                hint="Write that computation another way in the model (another op, dtype or "
                "shape; e.g. compute booleans as float), or add a converter that emits "
                "supported ops through a slimc plugin (hook slimc_register_converters)."
            ) from None
        raise LoweringError(
            f"TVM could not build the model for {spec.name}: {type(exc).__name__}: "
            f"{_last_line(exc)}",
            hint="Please report it with the model; `slimc compile --save-ir` writes the IR.",
        ) from exc
    _release_relax_functions(mod)
    if keep is not None and streamed is not None:
        keep["weights"] = list(streamed.tensors)
    triple = spec.triple or str(target.attrs.get("mtriple", "")) or None
    # The weights travel in the executable's blob: embed it with .incbin, not through LLVM
    # (several in-memory copies of every weight; see blob_pack).
    # The library records the instruction set it needs (slimc.isa.ISA_SECTION): loading it
    # on a CPU without it is refused in one paragraph instead of dying with SIGILL.
    pack = {"fpack_imports": functools.partial(
        streamed.pack_imports if streamed else pack_imports_incbin, isa=required_isa(spec))} \
        if incbin_supported() else {}
    if spec.is_cross:
        executable.export_library(str(path), fcompile=zig_cross_compiler(triple), **pack)
    elif shutil.which("g++") or shutil.which("c++"):
        executable.export_library(str(path), **pack)
    else:  # no system compiler: link for the host with zig, still pip-only
        executable.export_library(str(path), fcompile=zig_cross_compiler(_host_triple()),
                                  **pack)
    return path


def _keeping(pipeline, keep: dict):
    """``pipeline``, its output also stored in ``keep["scheduled"]`` (before the streamed
    weights are stubbed out of it)."""
    import tvm

    def run(mod, *args):
        out = pipeline(mod, *args)
        # a shallow copy: the stubbing replaces the functions of ``out`` in place
        keep["scheduled"] = tvm.IRModule(dict(out.functions_items()), attrs=out.attrs,
                                         global_infos=out.global_infos)
        return out
    return run


def _consuming(pipeline):
    """``pipeline`` run on a shallow copy of its input module, whose Relax functions are removed
    first (in place: the caller's module object is emptied too).

    Why: the caller (and ``relax.build``) keep the input module referenced for the whole
    build, and its functions bind the original weights; once the pipeline has replaced them
    (weights transposed, padded, packed: a new constant each), nothing else needs the
    originals, but they stayed resident beside the new ones until the build ended, about one
    more copy of the model at the compile's peak. With the input emptied, each original is
    freed as soon as the pass that rewrote it returns.
    """
    import tvm

    def run(mod, *args):
        work = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs,
                            global_infos=mod.global_infos)
        _release_relax_functions(mod)
        del mod
        return pipeline(work, *args)

    return run


def _release_relax_functions(mod) -> None:
    """Remove the built Relax functions from ``mod``: their bound constants are the model's
    weights (shared with the IR, or converted copies), and the executable has its own. Dropping
    them before ``export_library`` serializes the executable keeps one copy fewer alive at the
    compile's peak. The module is consumed: callers pass a module they do not reuse."""
    from tvm import relax

    from slimc.memory import return_freed_memory

    built = [gvar for gvar, func in mod.functions_items() if isinstance(func, relax.Function)]
    for gvar in built:
        del mod[gvar]
    return_freed_memory()


def _pipeline(target, tuning=None):
    """slimc's scheduled pipeline for llvm targets; TVM's default for anything else."""
    if target.kind.name != "llvm":
        return "default"
    from slimc.backends.tvm.schedules import cpu_pipeline

    if tuning is None:
        return cpu_pipeline(target)
    return cpu_pipeline(target, before_schedule=tuning.passes())


def _host_triple() -> str:
    import platform

    return f"{platform.machine()}-linux-gnu" if sys.platform.startswith("linux") else "native"


def _last_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""
