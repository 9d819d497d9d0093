"""Verify a big cross artifact kernel by kernel: the whole model on the host, each distinct
compiled kernel once under the emulator.

Why: under ``qemu-aarch64`` the whole-model check of a 320M-parameter decoder on a 64-token
example costs ~2 minutes (qemu 7.2 emulates ~0.3 GFLOP/s per core), most of the compile. A
decoder runs each of its ~20 distinct kernels once per layer, so checking every distinct kernel
once costs ~1/layers of the whole run (plus the output projection, which runs once anyway).

The check has two halves, and together they cover what the whole-model check covered:

1. *Graph*: the module slimc's pipeline produced for the target (scheduled kernels, packed
   weights: :func:`.build.build_library` keeps it) is rebuilt for the host CPU from that very
   module: same kernels (the aarch64 schedules, vector widths and weight layouts, compiled by
   LLVM for x86-64), same Relax VM bytecode. It runs on the example input and must match the IR
   at the verification tolerance: a wrong graph, lowering or schedule shows here.
2. *Target code*: the written aarch64 library is loaded under the emulator (it loads and links
   against the aarch64 runtime) and each distinct kernel is called once, by its exported symbol,
   on the arguments the host run gave its first call (recorded through the VM's instrument hook:
   real activations, real token ids for gathers); weights come from the library's own weight
   section (``slimc_library_weight``), so the section's contents are checked too. Each
   kernel's outputs must match the host kernel's at the same tolerance.

What it does not cover, stated in the manifest: the aarch64 build of the VM bytecode driving
those kernels end to end (the bytecode is target-independent and ran on the host), and a
kernel's later calls (same code on other layers' data). Kernels that call target-specific LLVM
intrinsics (the ``sdot`` int8 kernels) cannot be compiled for the host:
:class:`KernelCheckUnavailable`, and the caller runs the whole model under the emulator.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from slimc.backends.tvm.script_frames import memoised_frame_modules

#: Environment variable: the whole-model emulated run is replaced by the per-kernel check when
#: its estimated duration (idle host, :mod:`.emulation_budget`) exceeds this many seconds.
ENV_VAR = "SLIMC_KERNEL_CHECK_ABOVE_S"
#: Default for :data:`ENV_VAR`: a tiny test model (~5-10 s) keeps the whole-model run.
DEFAULT_ABOVE_S = 60.0


class KernelCheckUnavailable(RuntimeError):
    """The module cannot be rebuilt for the host (``str(err)`` says why)."""


@dataclass
class KernelCase:
    """One distinct kernel's first call: its arguments and what it wrote."""

    name: str
    #: per argument: ("a", array) an activation/small constant, ("w", index) a library weight,
    #: ("s", value) a scalar, ("shape", [ints])
    args: list[tuple[str, Any]]
    outputs: list[int]
    expected: list[np.ndarray]


@dataclass
class HostRecord:
    """The host run of the rebuilt module: whole-model outputs and one case per kernel."""

    outputs: list[np.ndarray]
    cases: list[KernelCase]
    kernels_total: int
    kernel_calls: int
    weights_from_library: int = 0
    #: wall seconds of the host build and of the host run (recording included)
    build_s: float = 0.0
    run_s: float = 0.0
    #: kernels called but not checked: they write no VM-allocated tensor (shape functions)
    unchecked: list[str] = field(default_factory=list)


def threshold_s() -> float:
    """The estimated whole-model emulated seconds above which the per-kernel check runs."""
    import os

    text = os.environ.get(ENV_VAR)
    if not text:
        return DEFAULT_ABOVE_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        from slimc.errors import UsageError

        raise UsageError(f"{ENV_VAR}={text!r} is not a number of seconds >= 0.",
                         hint="Set it to e.g. 60 (0 always checks per kernel), or unset it.")
    return value


def _prim_funcs(mod) -> dict[str, Any]:
    from tvm import tirx

    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def _uses_llvm_intrinsics(func) -> bool:
    """Whether ``func`` calls LLVM intrinsics by id (target-specific: ``sdot``)."""
    return "call_llvm" in func.script()


def _kernel_outputs(mod, kernels: set[str]) -> dict[str, list[int]]:
    """Per kernel, the positions of its arguments that the VM allocated for it to write: its
    outputs (in the VM-lowered Relax functions, ``R.vm.alloc_tensor`` results no call has
    received yet)."""
    from tvm import relax

    outputs: dict[str, list[int]] = {}
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        allocated = set()
        for block in func.body.blocks:
            for binding in block.bindings:
                value = binding.value
                if not isinstance(value, relax.Call):
                    continue
                op = getattr(value.op, "name", None) or getattr(value.op, "name_hint", None)
                if op in ("relax.vm.alloc_tensor", "relax.builtin.alloc_tensor",
                          "relax.memory.alloc_tensor"):
                    allocated.add(binding.var)
                    continue
                if isinstance(value.op, relax.GlobalVar) and op in kernels \
                        and op not in outputs:
                    outputs[op] = [i for i, arg in enumerate(value.args) if arg in allocated]
                allocated.difference_update(value.args)
    return outputs


def host_module(scheduled):
    """``scheduled`` retargeted to the host CPU; raises :class:`KernelCheckUnavailable` when a
    kernel calls LLVM intrinsics (target-specific: ``sdot``)."""
    import tvm

    functions = {}
    for gv, func in scheduled.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            if _uses_llvm_intrinsics(func):
                raise KernelCheckUnavailable(
                    f"kernel {gv.name_hint} calls target-specific LLVM intrinsics, which the "
                    "host cannot compile")
            if func.attrs is not None and "target" in func.attrs:
                func = func.without_attr("target")
        functions[gv] = func
    return tvm.IRModule(functions, attrs=scheduled.attrs, global_infos=scheduled.global_infos)


@memoised_frame_modules()
def record_on_host(scheduled, weights: Sequence[Any], inputs: Sequence[np.ndarray],
                   threads: int | None = None) -> HostRecord:
    """Build ``scheduled`` for the host, run ``main`` on ``inputs``, and record the first call
    of every kernel (arguments before, written arguments after)."""
    import tvm
    from slimc.backends.tvm.runtime import set_threads
    from tvm import relax

    if threads:
        set_threads(threads)
    mod = host_module(scheduled)
    funcs = _prim_funcs(mod)
    outputs_of = _kernel_outputs(mod, set(funcs))
    started = time.perf_counter()
    try:
        with tvm.transform.PassContext(opt_level=3):
            executable = relax.build(mod, target=tvm.target.Target("llvm"), relax_pipeline=None)
    except Exception as exc:  # noqa: BLE001 - any build failure: fall back to the whole run
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        raise KernelCheckUnavailable(
            f"the host build failed: {type(exc).__name__}: {lines[-1] if lines else ''}") from exc
    del mod
    built = time.perf_counter()
    weight_at = {}
    for index, tensor in enumerate(weights):
        array = np.from_dlpack(tensor)
        weight_at[(array.__array_interface__["data"][0], array.shape, str(array.dtype))] = index

    cases: dict[str, KernelCase] = {}
    pending: dict[str, list] = {}
    calls = [0]
    problems: list[str] = []
    unchecked: set[str] = set()

    def convert(value) -> tuple[str, Any]:
        if isinstance(value, tvm.runtime.Tensor):
            array = np.from_dlpack(value)
            key = (array.__array_interface__["data"][0], array.shape, str(array.dtype))
            if key in weight_at:
                return ("w", weight_at[key])
            return ("a", array.copy())
        if isinstance(value, (bool, int, float, np.integer, np.floating)):
            return ("s", value.item() if hasattr(value, "item") else value)
        if isinstance(value, tvm.runtime.ShapeTuple):
            return ("shape", [int(v) for v in value])
        raise TypeError(type(value).__name__)

    def instrument(func, symbol, before, ret, *args):
        name = str(symbol)
        if name not in funcs:
            return 0
        calls[0] += before
        if name in cases or name in unchecked:
            return 0
        if before:
            try:
                pending[name] = [convert(a) for a in args]
            except TypeError as exc:
                problems.append(f"{name}: argument of type {exc}")
            return 0
        recorded = pending.pop(name, None)
        if recorded is None:
            return 0
        written = [i for i in outputs_of.get(name, ()) if i < len(args)]
        if not written:  # writes no VM-allocated tensor: a shape function (the shape heap)
            unchecked.add(name)
            return 0
        expected = [np.from_dlpack(args[i]).copy() for i in written]
        cases[name] = KernelCase(name, recorded, written, expected)
        return 0

    vm = relax.VirtualMachine(executable, tvm.cpu())
    vm.set_instrument(instrument)
    result = vm["main"](*[tvm.runtime.tensor(np.require(x, requirements="C")) for x in inputs])
    from slimc.backends.tvm.runtime import _flatten

    outputs = _flatten(result)
    del vm, executable, result
    if problems:
        raise KernelCheckUnavailable("cannot record " + "; ".join(problems[:3]))
    used = sum(1 for c in cases.values() for kind, _ in c.args if kind == "w")
    return HostRecord(outputs, list(cases.values()), kernels_total=len(funcs),
                      kernel_calls=calls[0], weights_from_library=used,
                      build_s=built - started, run_s=time.perf_counter() - built,
                      unchecked=sorted(unchecked))


def write_plan(record: HostRecord, arrays_path: str) -> str:
    """Save the activation arguments to ``arrays_path`` (``.npz``) and return the guest's plan
    (JSON): per case the kernel, its arguments (npz keys, weight indices, scalars) and its
    output positions."""
    arrays: dict[str, np.ndarray] = {}
    plan = []
    for c, case in enumerate(record.cases):
        args = []
        for a, (kind, value) in enumerate(case.args):
            if kind == "a":
                key = f"k{c}_{a}"
                arrays[key] = value
                args.append(["a", key])
            else:
                args.append([kind, value])
        plan.append({"name": case.name, "args": args, "outputs": case.outputs})
    np.savez(arrays_path, **arrays)
    return json.dumps(plan)


def compare(record: HostRecord, emulated: Sequence[np.ndarray], tolerance: float
            ) -> tuple[float, str | None, list[str]]:
    """Worst per-kernel relative L2 error, the kernel it came from, and the kernels over
    ``tolerance``."""
    worst, worst_name, failed = 0.0, None, []
    pos = 0
    for case in record.cases:
        got = list(emulated[pos:pos + len(case.expected)])
        pos += len(case.expected)
        if len(got) != len(case.expected) or any(
                g.shape != e.shape for g, e in zip(got, case.expected, strict=False)):
            failed.append(f"{case.name} (output shapes differ)")
            worst, worst_name = float("inf"), case.name
            continue
        err = _error(case.expected, got)
        if not np.isfinite(err) or err > worst:
            worst, worst_name = float(err), case.name
        if not err <= tolerance:
            failed.append(f"{case.name} (relative L2 {err:.3g})")
    return worst, worst_name, failed


def _error(expected: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    """Relative L2 over the finite elements; inf unless non-finite ones (``-inf`` masks) are
    the same in both."""
    from slimc.evaluators import relative_l2

    worst = 0.0
    for e, g in zip(expected, got, strict=True):
        e, g = e.astype(np.float64), g.astype(np.float64)
        finite = np.isfinite(e)
        if not np.array_equal(finite, np.isfinite(g)) or not np.array_equal(
                e[~finite], g[~finite], equal_nan=True):
            return float("inf")
        worst = max(worst, relative_l2([e[finite]], [g[finite]]))
    return worst
