"""``-j/--jobs``: how many cores the compiler itself uses (not the compiled model).

The parts of a compile or analysis that parallelise run on torch's intra-op thread pool
(GPTQ/SVD factorizations, large forwards) or on a pool of one worker per job running
single-threaded ops (:func:`map_single_threaded`: the per-layer W8A8 searches, the calibration
forwards of the quantize pass, the verification's noise-floor runs, the perturbation forwards
of ``slimc analyze``).
Both read :func:`torch.get_num_threads`, so one setting sizes them, and so does TVM's build of
the kernels (TIR lowering and LLVM code generation, one shard of kernels per job:
:mod:`slimc.backends.tvm.parallel_build`). The default is every core the process may use. The
artifact's runtime threads are ``--threads``, a separate setting.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from slimc.errors import UsageError

T = TypeVar("T")
R = TypeVar("R")


def default_jobs() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_jobs(jobs: int | None) -> int:
    """``jobs`` checked (a UsageError for anything below 1), or the default."""
    if jobs is None:
        return default_jobs()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UsageError(f"--jobs {jobs!r}: the number of compile threads must be a whole "
                         "number of at least 1.",
                         hint=f"Leave it out to use every core ({default_jobs()} here), or "
                         "pass e.g. -j 1 on a shared machine.")
    return jobs


@contextlib.contextmanager
def compile_jobs(jobs: int | None) -> Iterator[int]:
    """Run the block with torch's thread pool sized to ``jobs``; the previous size after."""
    import torch

    n = resolve_jobs(jobs)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the block with one torch intra-op thread; the previous count after.

    For code made of many small ops one after another (the prune-groups label propagation:
    integer ops on activation-shaped label tensors, node by node). On torch's 2-thread pool
    each small op pays an OpenMP team synchronisation: all-MiniLM-L6-v2's propagation took
    2.9-7.8 CPU-s (12-30 s wall) on 2 threads at load ~16, 0.15 CPU-s (0.7 s wall) on one.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_FLOOR = threading.local()


@contextlib.contextmanager
def pool_workers(n: int) -> Iterator[None]:
    """:func:`map_single_threaded` in this thread uses at least ``n`` workers in the block, even
    while torch runs with fewer intra-op threads. Why: the budget search drops to one intra-op
    thread where a timed forward is faster so (:func:`slimc.search.driver._fastest_torch_threads`:
    spinning OpenMP threads on a busy host), and its pool of single-threaded workers, which
    that spinning does not touch, then ran inline: one core idle, the 320M decoder's damage
    table twice as long (issue 18, docs/benchmarks.md "predicted probes")."""
    before = getattr(_FLOOR, "n", 1)
    _FLOOR.n = max(before, n)
    try:
        yield
    finally:
        _FLOOR.n = before


def map_single_threaded(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(item) for item in items]``, one item per core, each with single-threaded torch ops.

    Many compile steps run a small model forward (or a few small ops) once per calibration
    batch, per noise seed or per candidate. Split across torch's intra-op threads, such ops spend
    their time synchronising the OpenMP team (on a loaded 2-core host a MiniLM calibration
    forward at 1 x 128 tokens cost 10x its single-threaded CPU time), while the items are
    independent. Torch ops release the GIL, so a thread pool of :func:`torch.get_num_threads`
    workers, each running one item at a time with one intra-op thread, keeps every core busy
    without that overhead. Results come back in ``items`` order; ``fn`` must not share mutable
    state between items (or must lock it). With one job, or one item, it runs inline.
    """
    import torch

    threads = torch.get_num_threads()
    workers = max(threads, getattr(_FLOOR, "n", 1))  # (pool_workers: this thread only)
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)
