"""Keep the calling thread off the cores TVM pinned its pool workers to, for the length of a call.

Why: TVM's CPU thread pool (``src/runtime/thread_pool.cc``, ``threading_backend.cc`` in
apache-tvm 0.27) runs task 0 of every parallel loop on the *calling* thread and tasks 1..n-1
on n-1 workers, each pinned to one core (``TVM_BIND_THREADS`` default): worker i on
``sorted_order_[i]``, the cores sorted by ``cpuinfo_max_freq`` (fastest first, then by number).
The caller is left free on ``sorted_order_[0..n-1]``, hoping the OS keeps it on the core no
worker owns. On a loaded host Linux sometimes moves the caller onto a worker's core, and then
both halves of every parallel loop share one core for many calls in a row (LeViT-128S at two
threads on the 2-core Intel host: ~12 ms per call instead of ~7.5; docs/benchmarks.md, "Issue
16: the first call after an idle gap"). Pinning the caller to the cores the workers are *not*
on for the call, and restoring its mask after, removes that mode.

``SLIMC_PIN_CALLER=0`` switches it off. It is a no-op when there is no pool to collide with
(one thread), when TVM did not pin its workers (``TVM_BIND_THREADS`` other than 1,
``TVM_EXCLUDE_WORKER0=0``, more threads than cores, a cpuset that refused the pinning), and when
the caller's mask is narrower than the pool or already avoids the workers' cores. Results do
not change: only where the thread runs.
"""

from __future__ import annotations

import glob
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "SLIMC_PIN_CALLER"


def enabled_by_env() -> bool:
    """``SLIMC_PIN_CALLER`` unset or anything but ``0`` / ``false`` / ``no`` / ``off``."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def tvm_core_order() -> list[int]:
    """TVM's ``sorted_order_``: every online CPU, fastest ``cpuinfo_max_freq`` first, ties (and
    hosts without cpufreq) by number -- ``ThreadGroup::Impl::InitSortedOrder``."""
    def max_freq(cpu: int) -> int:
        try:
            return int(Path(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/cpuinfo_max_freq")
                       .read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0
    cpus = range(os.cpu_count() or 1)
    return sorted(cpus, key=lambda c: (-max_freq(c), c))


def expected_worker_cores(threads: int) -> set[int]:
    """The cores TVM pins a ``threads``-wide pool's workers to (empty: it pins none).

    kBig mode, worker 0's task run by the caller: worker i on ``sorted_order_[i]``, i >= 1;
    no pinning with ``TVM_BIND_THREADS`` set to anything but 1, with
    ``TVM_EXCLUDE_WORKER0=0`` (then the caller only waits), or with more threads than cores."""
    bind = os.environ.get("TVM_BIND_THREADS")
    if bind is not None and _atoi(bind) != 1:
        return set()
    exclude = os.environ.get("TVM_EXCLUDE_WORKER0")
    if exclude is not None and _atoi(exclude) == 0:
        return set()
    order = tvm_core_order()
    if threads <= 1 or len(order) < threads:
        return set()
    return set(order[1:threads])


def pinned_thread_cores(skip_tid: int | None = None) -> set[int]:
    """Cores some thread of this process (other than ``skip_tid``) is pinned to, alone."""
    cores: set[int] = set()
    for task in glob.glob("/proc/self/task/*"):
        tid = int(task.rsplit("/", 1)[1])
        if tid == skip_tid:
            continue
        try:
            mask = os.sched_getaffinity(tid)
        except OSError:  # the thread exited meanwhile
            continue
        if len(mask) == 1:
            cores |= mask
    return cores


def caller_cpus(threads: int, mask: set[int], workers: set[int]) -> set[int] | None:
    """Where the caller should run during a call: its ``mask`` minus the ``workers``' cores;
    None (leave it alone) when that is not a narrowing that keeps the pool's width."""
    if threads <= 1 or not workers or len(mask) < threads or not workers <= mask:
        return None
    free = mask - workers
    return free if free and free != mask else None


class CallerPinning:
    """Wraps calls into one TVM runtime: ``pinning.call(fn, *args)``.

    The workers' cores are taken from TVM's rule *and* checked against the process's threads
    once, after the first call (the pool starts lazily inside it): only cores a thread really
    is pinned to count, so a pool that was not pinned turns this off."""

    def __init__(self, threads: int, enabled: bool | None = None) -> None:
        self.threads = threads
        self.enabled = enabled_by_env() if enabled is None else enabled
        self._workers: set[int] | None = None if self.enabled and threads > 1 else set()
        self._lock = threading.Lock()

    @property
    def worker_cores(self) -> set[int] | None:
        """The pinned workers' cores the caller avoids (None: not known before a call)."""
        return self._workers

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._workers is None:  # first call: start the pool, then look at its threads
            mask = os.sched_getaffinity(0)
            try:
                result = fn(*args)
            finally:  # the pool's start narrows its caller to the pool's cores: undone
                os.sched_setaffinity(0, mask)
            with self._lock:
                if self._workers is None:
                    expected = expected_worker_cores(self.threads)
                    self._workers = expected & pinned_thread_cores(threading.get_native_id())
            return result
        if not self._workers:
            return fn(*args)
        try:
            mask = os.sched_getaffinity(0)
        except OSError:  # pragma: no cover - no affinity support
            return fn(*args)
        target = caller_cpus(self.threads, mask, self._workers)
        if target is None:
            return fn(*args)
        os.sched_setaffinity(0, target)
        try:
            return fn(*args)
        finally:
            os.sched_setaffinity(0, mask)

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with every call pinned."""
        return lambda *args: self.call(fn, *args)


def _atoi(text: str) -> int:
    """C's ``atoi`` (what TVM reads its environment with): leading digits, else 0."""
    text = text.strip()
    sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.lstrip("+"))
    number = ""
    for ch in digits:
        if not ch.isdigit():
            break
        number += ch
    return sign * int(number) if number else 0
