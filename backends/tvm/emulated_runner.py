"""Run a TVM Relax library once: ``python emulated_runner.py model.so inputs.npz outputs.npz``.

Why a standalone script: it executes *inside* qemu-aarch64 with the aarch64
Python of the sysroot built by ``.ci/aarch64-sysroot.sh``, where slimc itself is
not importable and every imported Python module is interpreted under emulation.
So it imports only numpy and ``tvm_ffi`` and loads ``libtvm_runtime`` directly
with ctypes instead of ``import tvm``: the ``tvm`` package would pull in the IR,
TIR and script modules (~0.4 s more under qemu) and, where the full wheel is
present, the 230 MiB compiler library.  The Relax VM is driven through the same
packed functions ``tvm.runtime.vm.VirtualMachine`` calls (``vm_load_executable``
and ``vm_initialization``).

Inputs are read from the ``.npz`` keys ``arg0``, ``arg1``, ... in order; the
result of ``main`` (a tensor or arbitrarily nested tuples of tensors) is
flattened depth-first and saved as ``out0``, ``out1``, ...  ``TVM_NUM_THREADS``
in the environment sets the runtime's thread-pool size.  Timings go to stderr.
With ``@KERNELS.json`` as the fourth argument it calls single kernels instead
(:func:`run_kernels`: the per-kernel check of ``kernel_check.py``); ``- - - @-`` loads
the runtime first and reads the four paths from stdin.
"""

from __future__ import annotations

import time

_STARTED = time.time()  # wall clock at interpreter start (the host computes the guest's start-up)

import ctypes  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

# tvm_ffi imports ml_dtypes when it can (bfloat16/float8 numpy dtypes), and its C++ extension's
# initialisation costs ~7 CPU-seconds under qemu-aarch64 7.2 (`-X importtime`: 26 s of a 30 s
# import on a loaded 2-core host) -- more than most kernels. The runner never needs it: numpy's
# DLPack exchange (`np.from_dlpack`, `tvm_ffi.from_dlpack`) supports no ml_dtypes dtype anyway.
if __name__ == "__main__":  # the guest process only, never a host importer
    sys.modules.setdefault("ml_dtypes", None)  # type: ignore[assignment]  # -> ImportError
import tvm_ffi  # noqa: E402

_IMPORTED = time.time()

_KDL_CPU = 1
_POOLED_ALLOCATOR = 2
# TVM's generated kernels assume 64-byte aligned buffers (kAllocAlignment).
_ALIGN = 64


def _load_tvm_runtime() -> None:
    """Load libtvm_runtime globally: it registers the Relax VM and its builtins."""
    spec = importlib.util.find_spec("tvm")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the tvm package is not on sys.path")
    for pkg_dir in spec.submodule_search_locations:
        for sub in ("lib", "lib64", ""):
            path = os.path.join(pkg_dir, sub, "libtvm_runtime.so")
            if os.path.exists(path):
                ctypes.CDLL(path, ctypes.RTLD_GLOBAL)
                return
    raise RuntimeError(f"libtvm_runtime.so not found under {spec.submodule_search_locations}")


def _to_tensor(array: np.ndarray) -> tvm_ffi.Tensor:
    """Copy ``array`` into a 64-byte aligned, C-contiguous buffer and wrap it zero-copy."""
    buf = np.empty(array.nbytes + _ALIGN, dtype=np.uint8)
    offset = -buf.ctypes.data % _ALIGN
    aligned = buf[offset : offset + array.nbytes].view(array.dtype).reshape(array.shape)
    aligned[...] = array
    return tvm_ffi.from_dlpack(aligned, require_alignment=_ALIGN, require_contiguous=True)


def _flatten(value: Any, out: list[np.ndarray]) -> None:
    """Depth-first flatten a VM result (Tensor / Array of results) into numpy arrays."""
    if isinstance(value, tvm_ffi.Tensor):
        # copy: the VM's pooled allocator may reuse the buffer after we return
        out.append(np.from_dlpack(value).copy())
    elif isinstance(value, (tvm_ffi.Array, list, tuple)):
        for item in value:
            _flatten(item, out)
    elif isinstance(value, (bool, int, float)):
        out.append(np.asarray(value))
    elif isinstance(value, tvm_ffi.Shape):
        out.append(np.asarray(list(value), dtype="int64"))
    else:
        raise TypeError(f"cannot convert VM output of type {type(value).__name__} to numpy")


def run_kernels(lib_path: str, in_path: str, out_path: str, plan_path: str) -> None:
    """Call single kernels of ``lib_path`` by their exported names, without the VM: the plan
    (JSON ``[{"name", "args": [["a", npz key] | ["w", weight index] | ["s", scalar] |
    ["shape", [ints]]], "outputs": [argument positions]}, ...]``) gives each call's arguments;
    the written arguments are saved one after the other (``out0``, ``out1``, ...).  ``"w"``
    arguments are the library's own weights (``slimc_library_weight``), read in place.

    ``plan_path`` ``-``: the guest was started before the host had built the library and
    recorded the arguments (its start-up overlaps the host's work, ``emulation.KernelGuest``);
    it loads the TVM runtime, then reads the four paths (library, inputs, outputs, plan) from
    stdin, one a line. An empty stdin (the host gave up) exits with status 3."""
    print(f"slimc-runner: started {_STARTED:.3f} imported {_IMPORTED:.3f}", file=sys.stderr)
    t0 = time.perf_counter()
    _load_tvm_runtime()
    waited = 0.0
    if plan_path == "-":
        ready = time.perf_counter()
        paths = [sys.stdin.readline().rstrip("\n") for _ in range(4)]
        if not all(paths):
            sys.exit(3)
        lib_path, in_path, out_path, plan_path = paths
        waited = time.perf_counter() - ready
        print(f"slimc-runner: waited {waited:.3f}s", file=sys.stderr)
    lib = tvm_ffi.load_module(lib_path)
    with open(plan_path) as f:
        plan = json.load(f)
    weight = None
    outputs: list[np.ndarray] = []
    t1 = time.perf_counter()
    with np.load(in_path) as npz:
        for case in plan:
            args: list[Any] = []
            for kind, value in case["args"]:
                if kind == "a":
                    args.append(_to_tensor(npz[value]))
                elif kind == "w":
                    if weight is None:
                        weight = lib.get_function("slimc_library_weight", query_imports=True)
                    args.append(weight(int(value)))
                elif kind == "shape":
                    args.append(tvm_ffi.Shape(value))
                else:
                    args.append(value)
            started = time.perf_counter()
            lib.get_function(case["name"], query_imports=True)(*args)
            print(f"slimc-runner: {case['name']} {time.perf_counter() - started:.3f}s",
                  file=sys.stderr)
            for i in case["outputs"]:
                outputs.append(np.from_dlpack(args[i]).copy())
    t2 = time.perf_counter()
    np.savez(out_path, **{f"out{i}": a for i, a in enumerate(outputs)})
    print(f"slimc-runner: load {t1 - t0 - waited:.3f}s kernels {t2 - t1:.3f}s "
          f"({len(plan)} kernels) "
          f"save {time.perf_counter() - t2:.3f}s", file=sys.stderr)


def run(lib_path: str, in_path: str, out_path: str, plan: str | None = None) -> None:
    """Load ``lib_path``, run ``main`` on the arrays of ``in_path``, save to ``out_path``.

    ``plan`` (JSON ``[[function, [input indices]], ...]``) runs those functions in turn instead
    and saves their outputs one after the other.
    """
    t0 = time.perf_counter()
    _load_tvm_runtime()
    lib = tvm_ffi.load_module(lib_path)
    vm = lib["vm_load_executable"]()
    vm["vm_initialization"](_KDL_CPU, 0, _POOLED_ALLOCATOR)
    with np.load(in_path) as npz:
        count = sum(1 for k in npz.files if k.startswith("arg"))
        args = [_to_tensor(npz[f"arg{i}"]) for i in range(count)]
    steps = json.loads(plan) if plan else [["main", list(range(count))]]
    t1 = time.perf_counter()
    outputs: list[np.ndarray] = []
    for function, indices in steps:
        _flatten(vm[function](*[args[i] for i in indices]), outputs)
    t2 = time.perf_counter()
    np.savez(out_path, **{f"out{i}": a for i, a in enumerate(outputs)})
    print(f"slimc-runner: load {t1 - t0:.3f}s run {t2 - t1:.3f}s", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit("usage: emulated_runner.py MODEL.so INPUTS.npz OUTPUTS.npz [PLAN.json|@KERNELS]")
    if len(sys.argv) == 5 and sys.argv[4].startswith("@"):
        run_kernels(*sys.argv[1:4], sys.argv[4][1:])
    else:
        run(*sys.argv[1:])
