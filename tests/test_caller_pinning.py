"""The runtime keeps the calling thread off the cores TVM pinned its pool workers to, during a
call only (issue 16: the caller landing on the worker's core halved 2-thread speed for many
calls in a row). A real TVM build of a tiny Relax module: a parallel TIR loop (it starts TVM's
pool) and a ``call_packed`` probe that records the calling thread's CPU mask *inside* the call.
Each case runs on a fresh thread, so TVM's thread-local pool is started with the case's thread
count whatever other tests did on the main thread.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from slimc.backends.tvm import affinity

SEEN: list[set[int]] = []


def _probe(tensor):
    SEEN.append(os.sched_getaffinity(0))
    return tensor


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    import tvm
    import tvm_ffi
    from tvm.script import ir as I
    from tvm.script import relax as R
    from tvm.script import tirx as T

    tvm_ffi.register_global_func("slimc_test.affinity_probe", _probe, override=True)

    @I.ir_module(check_well_formed=False)
    class Module:
        @T.prim_func
        def add_one(A: T.Buffer((64, 256), "float32"), B: T.Buffer((64, 256), "float32")):
            for i in T.parallel(64):
                for j in range(256):
                    B[i, j] = A[i, j] + T.float32(1)

        @R.function
        def main(x: R.Tensor((64, 256), "float32")):
            y = R.call_tir(Module.add_one, (x,), out_ty=R.Tensor((64, 256), "float32"))
            z = R.call_packed("slimc_test.affinity_probe", y,
                              ty_args=R.Tensor((64, 256), "float32"))
            return z

    path = tmp_path_factory.mktemp("pinning") / "probe.so"
    tvm.compile(Module, target="llvm").export_library(str(path))
    return path


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("TVM_BIND_THREADS", "TVM_EXCLUDE_WORKER0", affinity.ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TVM_NUM_THREADS", "1")  # restored after: NativeRunner sets it
    return monkeypatch


def _on_fresh_thread(fn):
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result()


def _calls(library, threads: int, calls: int = 3, mask: set[int] | None = None, **kw):
    """On a fresh thread (``mask``: its CPU mask first): a runner, ``calls`` calls; per call
    (mask inside, mask after, output ok), and the runner's worker cores."""
    from slimc.backends.tvm.runtime import NativeRunner

    def run():
        if mask is not None:
            os.sched_setaffinity(0, mask)
        runner = NativeRunner(library, threads, **kw)
        x = np.random.default_rng(0).random((64, 256), dtype=np.float32)
        rows = []
        for _ in range(calls):
            SEEN.clear()
            out = runner([x])
            rows.append((SEEN[-1], os.sched_getaffinity(0), np.array_equal(out[0], x + 1)))
        SEEN.clear()
        runner.pinned_vm["main"](runner._tvm.runtime.tensor(x))  # the generation loop's path
        rows.append((SEEN[-1], os.sched_getaffinity(0), True))
        return rows, runner.pinning.worker_cores, affinity.pinned_thread_cores()

    return _on_fresh_thread(run)


def _needs_two_cpus():
    if len(os.sched_getaffinity(0)) < 2 or (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPUs in this process's mask")


def test_caller_runs_off_the_workers_cores_during_a_call_and_gets_its_mask_back(
        library, clean_env):
    _needs_two_cpus()
    before = os.sched_getaffinity(0)
    rows, workers, pinned = _calls(library, 2)
    expected = affinity.expected_worker_cores(2)
    assert expected and workers == expected  # TVM's rule, confirmed by a thread pinned there
    assert workers <= pinned
    assert expected <= before
    for during, after, ok in rows[1:]:  # the first call starts the pool
        assert during == before - workers and not during & workers
        assert after == before
        assert ok
    assert rows[0][1] == before  # the pool's start narrowed the caller; undone
    assert os.sched_getaffinity(0) == before


def test_no_pinning_at_one_thread(library, clean_env):
    before = os.sched_getaffinity(0)
    rows, workers, _ = _calls(library, 1)
    assert workers == set()
    assert all(during == before and after == before and ok for during, after, ok in rows)


def test_switched_off_by_the_environment(library, clean_env):
    _needs_two_cpus()
    clean_env.setenv(affinity.ENV, "0")
    before = os.sched_getaffinity(0)
    rows, workers, pinned = _calls(library, 2)
    assert workers == set()
    assert affinity.expected_worker_cores(2) <= pinned  # TVM still pinned its worker
    assert all(during == before and after == before and ok for during, after, ok in rows[1:])


def test_unpinned_pool_turns_it_off(library, clean_env):
    _needs_two_cpus()
    clean_env.setenv("TVM_BIND_THREADS", "0")
    before = os.sched_getaffinity(0)
    rows, workers, _ = _calls(library, 2)
    assert workers == set()
    assert all(during == before and after == before and ok for during, after, ok in rows[1:])


def test_no_op_when_the_callers_mask_is_narrower_than_the_pool(library, clean_env):
    _needs_two_cpus()
    one = {min(os.sched_getaffinity(0))}
    rows, workers, _ = _calls(library, 2, mask=one)
    # the first call starts TVM's pool, which widens its caller to the pool's cores (TVM's own
    # SetMainThreadFullCpuAffinity) for the rest of that call; the mask comes back after it
    assert rows[0][1] == one
    assert all(during == one and after == one and ok for during, after, ok in rows[1:])


def test_caller_cpus_rule():
    assert affinity.caller_cpus(2, {0, 1}, {1}) == {0}
    assert affinity.caller_cpus(2, {0, 1, 2, 3}, {1}) == {0, 2, 3}
    assert affinity.caller_cpus(4, {0, 1, 2, 3}, {1, 2, 3}) == {0}
    assert affinity.caller_cpus(1, {0, 1}, {1}) is None  # no pool
    assert affinity.caller_cpus(2, {0}, {1}) is None  # narrower than the pool
    assert affinity.caller_cpus(2, {2, 3}, {1}) is None  # workers outside the caller's mask
    assert affinity.caller_cpus(2, {0, 1}, set()) is None  # workers not pinned
    assert affinity.caller_cpus(2, {1}, {1}) is None


def test_expected_worker_cores_follow_tvms_environment(monkeypatch):
    for name in ("TVM_BIND_THREADS", "TVM_EXCLUDE_WORKER0"):
        monkeypatch.delenv(name, raising=False)
    order = affinity.tvm_core_order()
    assert sorted(order) == list(range(os.cpu_count() or 1))
    assert affinity.expected_worker_cores(1) == set()
    assert affinity.expected_worker_cores(len(order) + 1) == set()  # TVM does not pin then
    if len(order) >= 2:
        assert affinity.expected_worker_cores(2) == {order[1]}
    monkeypatch.setenv("TVM_BIND_THREADS", "0")
    assert affinity.expected_worker_cores(2) == set()
    monkeypatch.setenv("TVM_BIND_THREADS", "1")
    monkeypatch.setenv("TVM_EXCLUDE_WORKER0", "0")
    assert affinity.expected_worker_cores(2) == set()
    assert affinity._atoi(" 12x") == 12 and affinity._atoi("no") == 0


DRIVER = r"""
#define SLIMC_RUN_NO_MAIN
#include "slimc_run.c"
/* load argv[1], call main 3 times through pinned_call on argv[2]; print the mask after each */
int main(int argc, char** argv) {
  (void)argc;
  TVMFFIAny path = str_arg(argv[1]);
  TVMFFIAny lib = call(global("ffi.ModuleLoadFromFile"), &path, 1, argv[1]);
  TVMFFIAny vm = call(module_function(lib.v_obj, "vm_load_executable"), NULL, 0, "load");
  TVMFFIAny init[3] = {int_arg(kDLCPU), int_arg(0), int_arg(2)};
  call(module_function(vm.v_obj, "vm_initialization"), init, 3, "init");
  TVMFFIAny x = obj_arg(read_npy(argv[2]), kTVMFFITensor);
  TVMFFIObjectHandle fn = module_function(vm.v_obj, "main");
  for (int i = 0; i < 3; ++i) {
    pinned_call(fn, &x, 1, "main");
    cpu_set_t now;
    sched_getaffinity(0, sizeof now, &now);
    printf("after");
    for (int c = 0; c < CPU_SETSIZE; ++c) if (CPU_ISSET(c, &now)) printf(" %d", c);
    printf("\n");
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def c_driver(tmp_path_factory):
    """A C program built from slimc_run.c's helpers (as examples/cmake/app is), and a TVM build
    of a parallel loop without the Python probe (the C program has no Python)."""
    import shutil
    import subprocess
    from pathlib import Path

    import tvm
    import tvm_ffi
    from tvm.script import ir as I
    from tvm.script import relax as R
    from tvm.script import tirx as T

    if shutil.which("cc") is None:
        pytest.skip("a C compiler is needed")

    @I.ir_module
    class Module:
        @T.prim_func
        def add_one(A: T.Buffer((64, 256), "float32"), B: T.Buffer((64, 256), "float32")):
            for i in T.parallel(64):
                for j in range(256):
                    B[i, j] = A[i, j] + T.float32(1)

        @R.function
        def main(x: R.Tensor((64, 256), "float32")):
            return R.call_tir(Module.add_one, (x,), out_ty=R.Tensor((64, 256), "float32"))

    work = tmp_path_factory.mktemp("pinning_c")
    tvm.compile(Module, target="llvm").export_library(str(work / "add_one.so"))
    np.save(work / "x.npy", np.arange(64 * 256, dtype=np.float32).reshape(64, 256))
    (work / "driver.c").write_text(DRIVER)
    runner_dir = Path(__file__).resolve().parents[1] / "slimc" / "runner"
    include = Path(tvm_ffi.__file__).parent / "include"
    libs = [Path(tvm.__file__).parent / "lib", Path(tvm_ffi.__file__).parent / "lib"]
    cmd = ["cc", "-std=c11", "-O1", f"-I{runner_dir}", f"-I{include}", f"-I{include / 'dlpack'}",
           str(work / "driver.c"), "-o", str(work / "driver"), "-Wl,--no-as-needed",
           *(f"-L{d}" for d in libs), "-ltvm_runtime", "-ltvm_ffi",
           *(f"-Wl,-rpath,{d}" for d in libs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return work


def _drive(work, **env_extra):
    import subprocess

    env = {k: v for k, v in os.environ.items()
           if k not in ("TVM_BIND_THREADS", "TVM_EXCLUDE_WORKER0", affinity.ENV)}
    env.update({"TVM_NUM_THREADS": "2", "SLIMC_PIN_CALLER_TRACE": "1", **env_extra})
    proc = subprocess.run([str(work / "driver"), str(work / "add_one.so"), str(work / "x.npy")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines(), [ln for ln in proc.stderr.splitlines() if "pinned" in ln]


def _cpus(line: str) -> set[int]:
    return {int(c) for c in line.split()}


def test_c_runner_pins_the_caller_during_calls_and_restores_it(c_driver):
    _needs_two_cpus()
    before = os.sched_getaffinity(0)  # the child inherits this process's mask
    after, traces = _drive(c_driver)
    workers = affinity.expected_worker_cores(2)
    assert [_cpus(a.removeprefix("after")) for a in after] == [before] * 3
    assert len(traces) == 2  # calls 2 and 3; the first starts the pool
    for trace in traces:
        caller, _, on = trace.partition(": caller on")[2].partition(", workers on")
        assert _cpus(caller) == before - workers and _cpus(on) == workers


def test_c_runner_switched_off_or_single_threaded(c_driver):
    _needs_two_cpus()
    before = os.sched_getaffinity(0)
    for env in ({affinity.ENV: "0"}, {"TVM_NUM_THREADS": "1"}, {"TVM_BIND_THREADS": "0"}):
        after, traces = _drive(c_driver, **env)
        assert traces == [], env
        assert [_cpus(a.removeprefix("after")) for a in after] == [before] * 3
