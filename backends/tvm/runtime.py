"""Run a built library: natively in this process, or under qemu for a cross target.

The TVM runtime sizes its thread pool once, from ``TVM_NUM_THREADS``, on first use, and
defaults to one thread on small machines; :func:`set_threads` sets it before that happens.
"""

from __future__ import annotations

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


class NativeRunner:
    """A library loaded into a Relax VM on ``device`` (default: this CPU); call it with numpy
    arrays (copied to the device and back).

    ``pin_caller`` (default: on unless ``SLIMC_PIN_CALLER=0``): during each call the calling
    thread is kept off the cores TVM pinned its pool workers to (see
    :mod:`slimc.backends.tvm.affinity`); CPU devices only. ``flush_denormals`` (default: on
    unless ``SLIMC_FLUSH_DENORMALS=0``): the threads running a call flush denormal floats to
    zero, x86-64 CPU devices only (see :mod:`slimc.backends.tvm.denormals`)."""

    def __init__(self, library: str | os.PathLike[str], threads: int | None = None,
                 device=None, pin_caller: bool | None = None,
                 flush_denormals: bool | None = None) -> None:
        self.threads = set_threads(threads)
        import tvm
        from slimc.backends.tvm.affinity import CallerPinning
        from slimc.backends.tvm.denormals import DenormalFlush

        # tvm.runtime.vm, not tvm.relax: a deployment machine may hold TVM's runtime alone
        # (no libtvm_compiler), where importing tvm.relax fails registering compiler ops
        from tvm.runtime.vm import VirtualMachine

        from slimc.isa import check_cpu, library_isa

        self._tvm = tvm
        self._device = device if device is not None else tvm.cpu()
        # an AVX-512 library on an AVX2 CPU would die with SIGILL at its first such kernel
        check_cpu(library_isa(library), f"The library {library}")
        self._module = load_library(library)
        self._vm = VirtualMachine(self._module, self._device)
        on_cpu = self._device.dlpack_device_type() == 1  # kDLCPU
        self.pinning = CallerPinning(self.threads, pin_caller if on_cpu else False)
        self.denormals = DenormalFlush(self.threads, flush_denormals if on_cpu else False)

    def arity(self) -> int | None:
        """Number of inputs the library's ``main`` takes (None if the VM cannot say)."""
        try:
            return int(self._vm._get_function_arity("main"))
        except Exception:  # noqa: BLE001 - an older runtime without the query
            return None

    def __call__(self, inputs: Sequence[np.ndarray], function: str = "main") -> list[np.ndarray]:
        tvm = self._tvm
        # np.require, not np.ascontiguousarray: that turns a 0-d input into shape (1,), which
        # the library's shape check then refuses
        args = [tvm.runtime.tensor(np.require(x, requirements="C"), device=self._device)
                for x in inputs]
        result = self.pinning.call(self.denormals.call, self._vm[function], *args)
        return _flatten(result)

    @property
    def vm(self):
        """The raw Relax VM (calls through it are not pinned; see :attr:`pinned_vm`)."""
        return self._vm

    @property
    def pinned_vm(self) -> _PinnedFunctions:
        """``pinned_vm[name]``: the VM's function ``name``, each call pinned like
        :meth:`__call__`'s (the generation loop calls ``prefill``/``decode`` through it)."""
        return _PinnedFunctions(self._vm, self.pinning, self.denormals)

    @property
    def device(self):
        """The TVM device the VM runs on."""
        return self._device


class _PinnedFunctions:
    """``vm[name]`` with :class:`~slimc.backends.tvm.affinity.CallerPinning` and
    :class:`~slimc.backends.tvm.denormals.DenormalFlush` around each call."""

    def __init__(self, vm, pinning, denormals) -> None:
        self._vm, self._pinning, self._denormals = vm, pinning, denormals

    def __getitem__(self, name: str):
        function = self._vm[name]
        return self._pinning.wrap(lambda *args: self._denormals.call(function, *args))


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
                entries: Sequence[tuple[str, Sequence[int]]] | None = None,
                kernels: tuple[str, str] | None = None,
                timings: dict | None = None) -> list[np.ndarray]:
    """Run ``library`` once on ``inputs`` (cross: ``kernels`` calls single kernels instead,
    see :func:`~slimc.backends.tvm.emulation.run_emulated`); cross libraries go through
    qemu (may raise :class:`~slimc.backends.tvm.emulation.EmulatorUnavailable`, or
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
                            on_tick=on_tick, entries=entries,
                            **({"kernels": kernels, "timings": timings}
                               if kernels is not None else {}))
    runner = NativeRunner(library, threads)
    if entries is None:
        return runner(inputs)
    outputs: list[np.ndarray] = []
    for function, indices in entries:
        outputs += runner([inputs[i] for i in indices], function)
    return outputs
