"""Artifacts flush denormal floats to zero on x86-64 (issue 16: EfficientNet-B0's decaying
activations made every call ~25x slower on an Intel host, in slimc and ONNX Runtime alike).

A real TVM build of a parallel loop that halves its input: 2e-38 (a normal float) halved is
1e-38, a denormal, which a flushing thread writes as 0. The loop's rows are split between the
calling thread and TVM's pool worker, so an all-zero output shows both threads flushed; the
calling thread's own float mode must be back to the default after the call. Each case runs on a
fresh thread so that TVM's thread-local pool starts inside the case.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from slimc.backends.tvm import denormals

pytestmark = pytest.mark.skipif(not denormals.supported(), reason="x86-64 glibc only")

HALF_OF_NORMAL = np.float32(1e-38)  # below float32's smallest normal, 1.1755e-38
INPUT = np.full((64, 256), 2e-38, dtype=np.float32)


def _module():
    from tvm.script import ir as I
    from tvm.script import relax as R
    from tvm.script import tirx as T

    @I.ir_module
    class Module:
        @T.prim_func
        def halve(A: T.Buffer((64, 256), "float32"), B: T.Buffer((64, 256), "float32")):
            for i in T.parallel(64):
                for j in range(256):
                    B[i, j] = A[i, j] * T.float32(0.5)

        @R.function
        def main(x: R.Tensor((64, 256), "float32")):
            return R.call_tir(Module.halve, (x,), out_ty=R.Tensor((64, 256), "float32"))

    return Module


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    import tvm

    path = tmp_path_factory.mktemp("denormals") / "halve.so"
    tvm.compile(_module(), target="llvm").export_library(str(path))
    return path


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "2")  # restored after: NativeRunner sets it
    monkeypatch.delenv(denormals.ENV, raising=False)


def _on_fresh_thread(fn):
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def _run(library, *flags: bool):
    """Call the library once per flag, each through a new runner, on one fresh thread; the
    outputs, and whether the thread's own arithmetic still makes denormals afterwards."""
    from slimc.backends.tvm.runtime import NativeRunner

    def case():
        outputs = [NativeRunner(library, 2, flush_denormals=flag)([INPUT])[0] for flag in flags]
        after = np.float32(2e-38) * np.float32(0.5)
        return outputs, after

    return _on_fresh_thread(case)


def test_a_flushing_call_writes_zeros_on_every_thread(library, two_threads):
    (out,), after = _run(library, True)
    assert not out.any(), f"{np.count_nonzero(out)} of {out.size} elements kept a denormal"
    assert after == HALF_OF_NORMAL  # the caller's float mode was restored


def test_without_flushing_the_denormals_survive(library, two_threads):
    (out,), _ = _run(library, False)
    np.testing.assert_array_equal(out, np.full_like(out, HALF_OF_NORMAL))


def test_a_pool_started_unflushed_is_switched(library, two_threads):
    """The second runner finds the pool the first one started without flushing: its workers
    are switched by the one-off parallel launch, not by inheritance."""
    (plain, flushed), after = _run(library, False, True)
    assert plain.all() and not flushed.any()
    assert after == HALF_OF_NORMAL


def test_the_environment_switch(library, monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    monkeypatch.setenv(denormals.ENV, "0")
    (out,), _ = _run(library, None)
    assert out.all()
    monkeypatch.setenv(denormals.ENV, "1")
    (out,), _ = _run(library, None)
    assert not out.any()


def test_the_pool_launch_reaches_each_thread(two_threads):
    from slimc.backends.tvm.runtime import set_threads

    def case():
        set_threads(2)
        return denormals.flush_pool_workers(), denormals._FloatEnvironment().mxcsr()

    tasks, caller_mxcsr = _on_fresh_thread(case)
    assert tasks == min(2, len(os.sched_getaffinity(0)))
    # task 0 ran on the caller: its own mode is restored after the launch
    assert not caller_mxcsr & (denormals.MXCSR_FTZ | denormals.MXCSR_DAZ)


def test_the_c_runner_flushes(library, tmp_path):
    """slimc_run (the runtime bundle's C runner) flushes unless SLIMC_FLUSH_DENORMALS=0."""
    import tvm
    import tvm_ffi

    if shutil.which("cc") is None:
        pytest.skip("a C compiler is needed")
    runner_dir = Path(__file__).resolve().parents[1] / "slimc" / "runner"
    include = Path(tvm_ffi.__file__).parent / "include"
    libs = [Path(tvm.__file__).parent / "lib", Path(tvm_ffi.__file__).parent / "lib"]
    binary = tmp_path / "slimc_run"
    cmd = ["cc", "-std=c11", "-O1", f"-I{include}", f"-I{include / 'dlpack'}",
           str(runner_dir / "slimc_run.c"), "-o", str(binary), "-Wl,--no-as-needed",
           *(f"-L{d}" for d in libs), "-ltvm_runtime", "-ltvm_ffi",
           *(f"-Wl,-rpath,{d}" for d in libs)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    np.save(tmp_path / "x.npy", INPUT)
    outputs = {}
    for flag in ("1", "0"):
        out_dir = tmp_path / f"out{flag}"
        out_dir.mkdir()
        env = {**os.environ, "TVM_NUM_THREADS": "2", denormals.ENV: flag}
        proc = subprocess.run([str(binary), str(library), str(out_dir), str(tmp_path / "x.npy")],
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        outputs[flag] = np.load(out_dir / "out0.npy")
    assert not outputs["1"].any()
    np.testing.assert_array_equal(outputs["0"], np.full_like(outputs["0"], HALF_OF_NORMAL))
