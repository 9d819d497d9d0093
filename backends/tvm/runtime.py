"""Run a built library: natively in this process, or under qemu for a cross target.

The TVM runtime sizes its thread pool once, from ``TVM_NUM_THREADS``, on first use, and
defaults to one thread on small machines; :func:`set_threads` sets it before that happens.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def default_threads() -> int:
    """Cores this process may use (respects CPU affinity / container limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def set_threads(threads: int | None) -> int:
    """Fix the runtime thread count (``--threads``, else ``TVM_NUM_THREADS``, else all cores)."""
    if threads is None:
        raw = os.environ.get("TVM_NUM_THREADS") or ""
        try:
            threads = int(raw) if raw.strip() else default_threads()
        except ValueError:
            threads = 0
        if threads < 1:
            from slimc.errors import UsageError

            raise UsageError(f"TVM_NUM_THREADS={raw!r} is not a positive whole number.",
                             hint="Unset it, set it to e.g. 4, or pass --threads N.")
    os.environ["TVM_NUM_THREADS"] = str(threads)
    return threads


def load_library(library: str | os.PathLike[str]) -> Any:
    """``tvm.runtime.load_module`` of the library *now* at ``library``, never a stale copy.

    Why: ``tvm.runtime.load_module`` passes ``os.path.realpath(path)`` to ``dlopen``, and
    glibc's ``dlopen`` returns an object already loaded in this process whose name matches,
    without looking at the file. A library rebuilt at a path this process loaded before
    (``slimc.compile(..., output=out, force=True)`` then ``slimc.load(out)`` again in one
    process; a test building ``k.so`` in one folder over and over) silently ran the old code
    with the old constants baked into it (an attention mask, weights): wrong outputs, no error.
    So every load goes through a fresh, uniquely named *hard link* (``realpath`` would undo a
    symlink): glibc then finds no name match and compares file identity (device + inode)
    instead, which shares the handle of a file that did not change and loads a rebuilt one
    anew. The link is removed once loaded (the library needs only libc; nothing resolves
    ``$ORIGIN`` later). When ``/tmp`` is another file system the link is made beside the
    library; in a read-only folder there, the library is copied.
    """
    import shutil

    import tvm

    source = Path(library).resolve()
    with tempfile.TemporaryDirectory(prefix="slimc-load-") as tmp:
        alias = Path(tmp) / source.name  # keeps the suffix TVM picks the loader by
        try:
            os.link(source, alias)
        except OSError:  # /tmp on another file system: a link beside the library
            sibling = source.with_name(f".{source.stem}.load-{os.getpid()}-{id(alias)}.so")
            try:
                os.link(source, sibling)
            except OSError:  # a read-only folder: a copy
                shutil.copyfile(source, alias)
            else:
                try:
                    return tvm.runtime.load_module(str(sibling))
                finally:
                    sibling.unlink(missing_ok=True)
        return tvm.runtime.load_module(str(alias))


#: Set to "1" to keep the calling thread on TVM's caller core during a call
#: (:func:`caller_core`). Off by default: on the loaded host of 2026-12-01 it measured 4.41 vs
#: 8.01 ms once and 7.59 vs 8.05 / 8.27 vs 8.06 ms in the next minutes (MobileNetV2, 2
#: threads), so whether it helps on a quiet host is for a quiet run to decide.
PIN_CALLER_ENV = "SLIMC_PIN_CALLER"


def caller_core(threads: int | None, device=None) -> int | None:
    """The core to keep the calling thread on during a call with ``threads`` threads on
    ``device`` (see :func:`on_caller_core`), or None to leave it alone.

    Why: TVM's CPU thread pool runs task 0 of every parallel loop on the calling thread and
    pins its workers to the next cores (``sorted_order[1:]``, ``TVM_BIND_THREADS``), but
    leaves the calling thread free. Linux then often wakes the caller on a worker's core (the
    one it last ran on) and keeps it there: caller and worker take turns on one core
    (``sched_yield`` in both spin loops) while the other core idles, for whole calls.
    MobileNetV2 at 2 threads, same process, host loaded: 4.41 ms with the caller on core 0,
    8.32 ms on core 1 (the worker's), 8.01 ms left free, once; the quiet 21:43 table's slimc blocks
    were bimodal the same way (4.6 vs 7.6-10.4 ms), but repeated runs on the loaded host did
    not confirm the gain (see :data:`PIN_CALLER_ENV`), so this is opt-in. None unless
    ``SLIMC_PIN_CALLER=1``; None on non-Linux hosts, for one thread, for a non-CPU device,
    with ``TVM_BIND_THREADS`` other than 1 (workers not pinned), or when this process may use
    fewer cores than ``threads``.
    """
    if not threads or threads < 2 or os.environ.get(PIN_CALLER_ENV, "0") != "1" \
            or os.environ.get("TVM_BIND_THREADS", "1") != "1" \
            or not hasattr(os, "sched_setaffinity"):
        return None
    if device is not None and getattr(device, "device_type", 1) != 1:  # not kDLCPU
        return None
    try:
        cpus = os.sched_getaffinity(0)
    except OSError:
        return None
    return _caller_core(cpus) if len(cpus) >= threads else None


@contextlib.contextmanager
def on_caller_core(core: int | None):
    """Run the body with the calling thread on ``core`` only (:func:`caller_core`), then
    give it back the affinity it had; nothing when ``core`` is None or not allowed."""
    if core is None:
        yield
        return
    try:
        saved = os.sched_getaffinity(0)
    except OSError:
        saved = set()
    if core not in saved:
        yield
        return
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def _caller_core(cpus: set[int]) -> int:
    """The core TVM leaves to the calling thread: the first of its ``sorted_order`` (cores by
    ``cpuinfo_max_freq``, fastest first, then by id; workers take the next ones) that this
    process may use."""
    def max_freq(cpu: int) -> int:
        try:
            return int(Path(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/cpuinfo_max_freq")
                       .read_text().strip())
        except (OSError, ValueError):
            return 0

    return min(cpus, key=lambda cpu: (-max_freq(cpu), cpu))


class NativeRunner:
    """A library loaded into a Relax VM on ``device`` (default: this CPU); call it with numpy
    arrays (copied to the device and back)."""

    def __init__(self, library: str | os.PathLike[str], threads: int | None = None,
                 device=None) -> None:
        self.threads = set_threads(threads)
        import tvm
        from tvm import relax

        self._tvm = tvm
        self._device = device if device is not None else tvm.cpu()
        self._module = load_library(library)
        self._vm = relax.VirtualMachine(self._module, self._device)
        self._caller_core = caller_core(self.threads, self._device)

    def arity(self) -> int | None:
        """Number of inputs the library's ``main`` takes (None if the VM cannot say)."""
        try:
            return int(self._vm._get_function_arity("main"))
        except Exception:  # noqa: BLE001 - an older runtime without the query
            return None

    def __call__(self, inputs: Sequence[np.ndarray], function: str = "main") -> list[np.ndarray]:
        tvm = self._tvm
        args = [tvm.runtime.tensor(np.ascontiguousarray(x), device=self._device)
                for x in inputs]
        with on_caller_core(self._caller_core):
            result = self._vm[function](*args)
        return _flatten(result)

    @property
    def vm(self):
        return self._vm

    @property
    def device(self):
        """The TVM device the VM runs on."""
        return self._device


def _flatten(value) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    out: list[np.ndarray] = []
    for item in value:
        out.extend(_flatten(item))
    return out


def run_library(library: Path, inputs: Sequence[np.ndarray], *, cross_triple: str | None,
                threads: int | None = None, timeout: float | None = None,
                on_tick: Callable[[float], None] | None = None,
                entries: Sequence[tuple[str, Sequence[int]]] | None = None) -> list[np.ndarray]:
    """Run ``library`` once on ``inputs``; cross libraries go through qemu (may raise
    :class:`~slimc.backends.tvm.emulation.EmulatorUnavailable`, or
    :class:`~slimc.backends.tvm.emulation.EmulationError` when the guest fails or outlives
    ``timeout`` seconds; ``on_tick(elapsed_s)`` reports progress meanwhile).

    ``entries`` (default: ``main`` on all inputs): run each named function on the inputs at
    the given indices, in order, and concatenate their outputs.
    """
    if cross_triple:
        from slimc.backends.tvm.emulation import find_emulator, run_emulated

        emulator = find_emulator(cross_triple)
        return run_emulated(library, list(inputs), threads=threads, emulator=emulator,
                            **({"timeout": timeout} if timeout is not None else {}),
                            on_tick=on_tick, entries=entries)
    runner = NativeRunner(library, threads)
    if entries is None:
        return runner(inputs)
    outputs: list[np.ndarray] = []
    for function, indices in entries:
        outputs += runner([inputs[i] for i in indices], function)
    return outputs
