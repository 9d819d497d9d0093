"""Flush denormal floats to zero in the threads that run an artifact (x86-64: MXCSR FTZ + DAZ).

Why: on Intel cores an arithmetic instruction that reads or produces a denormal float (below
1.2e-38) takes a microcode assist, ~100x the normal cost. Activations that decay through many
layers become denormal: EfficientNet-B0 with random weights spent 3067 ms per call on the
2-core Intel host with the default float mode and 123 ms with denormals flushed (ONNX Runtime:
2959 ms, it does not flush unless asked; docs/benchmarks.md, "Denormals"). A denormal is
smaller than any value an inference result can depend on, so flushing it to zero (FTZ: results;
DAZ: inputs) is what TensorFlow's thread pools and many inference engines do; PyTorch offers it
as ``torch.set_flush_denormal``.

How: the float mode is per thread. During each call the *calling* thread (TVM runs task 0 of
every parallel loop on it) is switched to flushing and restored after, so the user's own numpy
or torch code on that thread never sees the change. TVM's pool workers run only TVM's kernels:
they are switched once per calling thread (each calling thread has its own pool in TVM 0.27,
``ThreadPool::ThreadLocal``) by a one-off ``TVMBackendParallelLaunch`` whose tasks set the mode
on whichever worker runs them. The mode is set through glibc's ``fegetenv``/``fesetenv`` (the
MXCSR word sits at byte 28 of x86-64's ``fenv_t``), so no compiler is needed at run time.

``SLIMC_FLUSH_DENORMALS=0`` switches it off (results then match a non-flushing engine bit for
bit). Not done on aarch64: its cores handle denormals in hardware at (near) full speed, and
its ``fenv_t`` differs; other platforms are left alone too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import threading
from collections.abc import Callable
from typing import Any

ENV = "SLIMC_FLUSH_DENORMALS"
#: MXCSR bits: flush-to-zero (denormal results) and denormals-are-zero (denormal inputs).
MXCSR_FTZ, MXCSR_DAZ = 0x8000, 0x0040
_FENV_SIZE = 32  # sizeof(fenv_t) on x86-64 glibc
_MXCSR_OFFSET = 28


def enabled_by_env() -> bool:
    """``SLIMC_FLUSH_DENORMALS`` unset or anything but ``0`` / ``false`` / ``no`` / ``off``."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class _FloatEnvironment:
    """This thread's floating-point environment through glibc (x86-64 only)."""

    def __init__(self) -> None:
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        self._get = libm.fegetenv
        self._set = libm.fesetenv
        self._get.argtypes = self._set.argtypes = [ctypes.c_void_p]

    def save(self) -> ctypes.Array:
        env = (ctypes.c_ubyte * _FENV_SIZE)()
        if self._get(env) != 0:
            raise OSError("fegetenv failed")
        return env

    def restore(self, env: ctypes.Array) -> None:
        self._set(env)

    def flush(self) -> ctypes.Array:
        """Switch this thread to flushing denormals; returns the environment to restore."""
        saved = self.save()
        env = (ctypes.c_ubyte * _FENV_SIZE).from_buffer_copy(saved)
        word = int.from_bytes(bytes(env[_MXCSR_OFFSET:_MXCSR_OFFSET + 4]), "little")
        word |= MXCSR_FTZ | MXCSR_DAZ
        env[_MXCSR_OFFSET:_MXCSR_OFFSET + 4] = list(word.to_bytes(4, "little"))
        self._set(env)
        return saved

    def mxcsr(self) -> int:
        """This thread's MXCSR word (tests and diagnostics)."""
        env = self.save()
        return int.from_bytes(bytes(env[_MXCSR_OFFSET:_MXCSR_OFFSET + 4]), "little")


def supported() -> bool:
    """x86-64 Linux with glibc's ``fenv_t`` layout."""
    return (platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")
            and platform.libc_ver()[0] == "glibc")


_LAMBDA = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def _parallel_launch() -> Callable[..., int] | None:
    """TVM runtime's ``TVMBackendParallelLaunch`` (None: not found in this process)."""
    for path in _loaded_tvm_runtimes():
        try:
            launch = ctypes.CDLL(path).TVMBackendParallelLaunch
        except (OSError, AttributeError):
            continue
        launch.argtypes = [_LAMBDA, ctypes.c_void_p, ctypes.c_int]
        launch.restype = ctypes.c_int
        return launch
    return None


def _loaded_tvm_runtimes() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libtvm_runtime" in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.endswith(".so"))


class DenormalFlush:
    """Wraps calls into one TVM CPU runtime: ``flush.call(fn, *args)``."""

    def __init__(self, threads: int, enabled: bool | None = None) -> None:
        self.threads = threads
        self.enabled = (enabled_by_env() if enabled is None else enabled) and supported()
        self._env = _FloatEnvironment() if self.enabled else None
        self._pools: set[int] = set()  # calling threads whose pool workers flush
        self._lock = threading.Lock()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._env is None:
            return fn(*args)
        saved = self._env.flush()
        try:
            # workers started inside this call inherit the caller's (flushing) mode; a pool
            # that already existed is switched explicitly, once per calling thread
            self._flush_pool()
            return fn(*args)
        finally:
            self._env.restore(saved)

    def _flush_pool(self) -> None:
        caller = threading.get_ident()
        if self.threads <= 1 or caller in self._pools:
            return
        with self._lock:
            if caller in self._pools:
                return
            self._pools.add(caller)
        flush_pool_workers(self._env)


def flush_pool_workers(env: _FloatEnvironment | None = None) -> int:
    """Switch the calling thread's TVM pool workers to flushing denormals; the number of
    tasks that ran (0: TVM's launch was not found). The calling thread runs task 0 too: its
    own mode is restored after."""
    env = env or _FloatEnvironment()
    launch = _parallel_launch()
    if launch is None:
        return 0
    ran: list[int] = []

    def task(task_id: int, _penv: int, _cdata: int) -> int:
        env.flush()  # the worker keeps it: it only ever runs TVM kernels
        ran.append(task_id)
        return 0

    callback = _LAMBDA(task)
    saved = env.save()
    try:
        launch(callback, None, 0)  # 0 tasks: one per pool thread
    finally:
        env.restore(saved)
    return len(ran)
