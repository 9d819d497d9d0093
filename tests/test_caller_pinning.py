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
