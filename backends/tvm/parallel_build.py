"""Build a Relax module's kernels on ``-j`` threads: TIR lowering and LLVM code generation of
independent kernels in parallel, one object file per shard, linked into the one library.

Why: ``relax.build`` lowers and compiles every ``PrimFunc`` of a model as one LLVM module, on
one thread: the TIR pipeline, LLVM's IR optimisation (``tirx.build``) and, at
``export_library``, its machine-code emission. For a CNN with ~100-200 distinct kernels
(DenseNet-121, EfficientNet, RegNet) that serial part is ~40% of an untuned ``-O0`` compile
(py-spy, docs/benchmarks.md "parallel kernel build"), while the second core idles.

How: after slimc's Relax pipeline (the same passes as before), the kernels are split into
``jobs`` shards of about equal size; each thread builds its shard with ``tvm.tirx.build`` and
writes its object file (TVM's FFI calls release the GIL, LLVM contexts are per module). Each
object is wrapped as a ``static_library`` module, which ``export_library`` links as it is: the
library holds the same functions, compiled by the same LLVM passes per function (kernels never
call one another; a module where one does is built serially), so the artifact computes
bit-identical results (tests/test_parallel_build.py compares it with the serial build's).
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

#: Below this many kernels a module is built serially (threads would not pay for themselves).
MIN_KERNELS = 8


def build_jobs() -> int:
    """The ``-j`` setting in force (:func:`slimc.jobs.compile_jobs` sizes torch's pool)."""
    import torch

    return max(1, torch.get_num_threads())


def relax_build(mod, target, relax_pipeline, jobs: int):
    """``relax.build(mod, target, relax_pipeline=...)`` with the kernels built on ``jobs``
    threads (:func:`build_kernels`); the serial ``relax.build`` when ``jobs`` is 1. Call it
    inside the ``PassContext`` the build should use (it is re-entered in every thread)."""
    from tvm import relax
    from tvm.relax import vm_build

    if jobs <= 1:
        return relax.build(mod, target=target, relax_pipeline=relax_pipeline)
    with target:
        mod = relax_pipeline(mod)
    attrs = dict(mod.attrs) if mod.attrs else {}
    ext_libs = list(attrs.get("external_mods", []))
    params = dict(attrs.get("const_name_to_constant", {}))
    builder = relax.ExecBuilder()
    mod = vm_build._vmcodegen(builder, mod, "bytecode")
    tir_mod = vm_build._filter_tir(mod)
    del mod
    libs: list[Any] = []
    if tir_mod is not None and len(tir_mod.get_global_vars()) > 0:
        tir_mod = vm_build._auto_attach_system_lib_prefix(tir_mod, target, None)
        libs = build_kernels(tir_mod, target, jobs)
    if any(vm_build._is_device_module(m) for m in ext_libs):  # not on llvm targets
        raise ValueError("device modules need relax.build's own linking")
    lib = libs[0] if libs else None
    executable = vm_build._ffi_api.VMLink(builder, target, lib, libs[1:] + ext_libs, params)
    return vm_build.VMExecutable(executable)


def build_kernels(tir_mod, target, jobs: int) -> list[Any]:
    """The runtime modules holding every ``PrimFunc`` of ``tir_mod`` compiled for ``target``:
    ``[tvm.tirx.build(tir_mod)]`` (one module, serial) when the module is small or its kernels
    call one another, else one ``static_library`` module per shard, built on ``jobs`` threads
    (each reads its object file into memory: the temporary folder goes at once)."""
    import tvm

    funcs = list(tir_mod.functions_items())
    texts = [tvm.ir.save_json(func) for _, func in funcs]
    sizes = [len(text) for text in texts]
    # a kernel calling another function of the module (a GlobalVar in its body) must be
    # compiled into the same LLVM module as its callee: build such a module serially
    calls = any('"ir.GlobalVar"' in text for text in texts)
    del texts
    if jobs <= 1 or len(funcs) < MIN_KERNELS or calls:
        return [tvm.tirx.build(tir_mod, target=target)]
    shards = _balanced_shards(sizes, jobs)
    context = tvm.transform.PassContext.current()
    def build(index: int, workdir: str) -> Any:
        shard = tvm.IRModule({funcs[i][0]: funcs[i][1] for i in shards[index]},
                             attrs=tir_mod.attrs)
        with context:  # PassContext.current() is per thread
            lib = tvm.tirx.build(shard, target=target)
        path = os.path.join(workdir, f"kernels{index}.o")
        lib.write_to_file(path)
        names = [str(func.attrs.get("global_symbol", gvar.name_hint))
                 for gvar, func in shard.functions_items()]
        return tvm.runtime.load_static_library(path, names)

    with tempfile.TemporaryDirectory(prefix="slimc-kernels-") as workdir, \
            ThreadPoolExecutor(max_workers=len(shards)) as pool:
        return list(pool.map(build, range(len(shards)), [workdir] * len(shards)))


def _balanced_shards(sizes: list[int], jobs: int) -> list[list[int]]:
    """Indices of ``sizes`` in ``min(jobs, len(sizes))`` groups of about equal total size
    (largest first, each to the lightest group), each group in its original order."""
    count = min(jobs, len(sizes))
    groups: list[list[int]] = [[] for _ in range(count)]
    totals = [0] * count
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        lightest = totals.index(min(totals))
        groups[lightest].append(i)
        totals[lightest] += sizes[i]
    return [sorted(g) for g in groups if g]
