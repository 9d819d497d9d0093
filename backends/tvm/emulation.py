"""Run a cross-compiled TVM Relax library under qemu-user and get numpy outputs back.

Why: slimc can build a model for aarch64 on an x86-64 machine (see ``cross_link``),
but a library that was only linked, never run, may still be wrong (bad target
flags, missing symbols, miscompiled kernels).  qemu-user executes the real aarch64
library with the real aarch64 TVM runtime, so its outputs can be compared with
PyTorch on the host, without aarch64 hardware.

The guest side needs an aarch64 sysroot (loader, libc, Python 3.11, tvm, numpy)
that ``.ci/aarch64-sysroot.sh`` assembles from Debian and PyPI; inside it
``emulated_runner.py`` runs the model.  Data crosses the boundary as ``.npz``
files, which both sides read with numpy alone.

Usage::

    try:
        outs = run_emulated("model.so", [x])
    except EmulatorUnavailable as err:
        print(f"skipped running the aarch64 artifact: {err}")
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EmulationError",
    "EmulationTimeout",
    "Emulator",
    "EmulatorUnavailable",
    "KernelGuest",
    "find_emulator",
    "run_emulated",
]

_LOG = logging.getLogger(__name__)
_RUNNER = Path(__file__).with_name("emulated_runner.py")
_STAMP = ".slimc-sysroot-stamp"
_SETUP_HINT = "install qemu-user and run .ci/aarch64-sysroot.sh"
# ELF e_machine values of the architectures we know a qemu-user binary for.
_ELF_MACHINES = {183: "aarch64"}
# Only variables meant for the host leak harmfully into the guest Python/loader.
_HOST_ONLY_ENV = ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "LD_PRELOAD", "LD_LIBRARY_PATH")
# The guest (qemu and its threads) gets a process group of its own, so that :func:`_kill` stops
# all of it and a terminal's Ctrl-C reaches only the compile (which stops the guest), but stays
# in the compile's session: a new session is a new scheduler autogroup on Linux, and the guest,
# which does most of the verification's work, escaped the compile's priority (`nice`, an
# autogroup's nice value) and competed at the default priority with all of the host's load.
_GUEST_GROUP: dict[str, Any] = {"process_group": 0}


class EmulationError(RuntimeError):
    """The emulated run failed; the message carries the guest's stderr tail."""


class EmulatorUnavailable(EmulationError):
    """No emulator for the triple on this machine; ``str(err)`` is a one-sentence reason."""


class EmulationTimeout(EmulationError):
    """The emulated run was stopped after its time budget (``limit_s``) ran out."""

    def __init__(self, message: str, limit_s: float) -> None:
        super().__init__(message)
        self.limit_s = limit_s


@dataclass(frozen=True)
class Emulator:
    """A usable qemu-user binary plus the guest sysroot it runs Python from."""

    arch: str
    qemu: Path
    sysroot: Path
    python: Path
    site_packages: Path

    def command(self, *args: str, env: dict[str, str] | None = None) -> list[str]:
        """The argv running ``python -S args...`` in the guest with ``env`` added.

        Guest-only variables go through ``qemu -E`` so they never reach qemu itself;
        PYTHONHOME/PYTHONPATH are host paths, which qemu's ``-L`` lookup falls back to.
        """
        guest_env = {
            "PYTHONHOME": str(self.sysroot / "usr"),
            "PYTHONPATH": str(self.site_packages),
            "PYTHONDONTWRITEBYTECODE": "1",
            **(env or {}),
        }
        cmd = [str(self.qemu), "-L", str(self.sysroot)]
        for key, value in guest_env.items():
            cmd += ["-E", f"{key}={value}"]
        return [*cmd, str(self.python), "-S", *args]


def _arch_of(triple: str) -> str:
    """``aarch64-linux-gnu`` / ``aarch64-unknown-linux-gnu`` -> ``aarch64``; Linux only."""
    parts = triple.split("-")
    if "linux" not in parts[1:]:
        raise EmulatorUnavailable(
            f"{triple} is not a Linux triple, and qemu-user only runs Linux programs"
        )
    return parts[0]


def _default_sysroot(arch: str) -> Path:
    env = os.environ.get(f"SLIMC_{arch.upper()}_SYSROOT")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "slimc" / f"{arch}-sysroot"


def find_emulator(triple: str = "aarch64-linux-gnu") -> Emulator:
    """Locate ``qemu-<arch>`` on PATH and the sysroot for ``triple``.

    The sysroot is ``$SLIMC_<ARCH>_SYSROOT`` or ``~/.cache/slimc/<arch>-sysroot``
    and must carry the completion stamp of ``.ci/aarch64-sysroot.sh``.  Raises
    :class:`EmulatorUnavailable` with a one-sentence reason, so callers can print
    ``f"skipped running the aarch64 artifact: {err}"``.
    """
    arch = _arch_of(triple)
    qemu = shutil.which(f"qemu-{arch}") or shutil.which(f"qemu-{arch}-static")
    if qemu is None:
        raise EmulatorUnavailable(f"qemu-{arch} not found; {_SETUP_HINT}")
    sysroot = _default_sysroot(arch).resolve()
    if not (sysroot / _STAMP).is_file():
        raise EmulatorUnavailable(
            f"no complete {arch} sysroot at {sysroot}; run .ci/{arch}-sysroot.sh "
            f"(or set SLIMC_{arch.upper()}_SYSROOT)"
        )
    pythons = sorted((sysroot / "usr" / "bin").glob("python3.[0-9]*"))
    if not pythons:
        raise EmulatorUnavailable(f"the sysroot {sysroot} has no usr/bin/python3.*")
    return Emulator(arch, Path(qemu), sysroot, pythons[-1], sysroot / "site-packages")


def _elf_arch(lib_path: Path) -> str | None:
    """The architecture named by an ELF header, or None when not a known ELF file."""
    try:
        with open(lib_path, "rb") as f:
            head = f.read(20)
    except OSError as err:
        raise EmulationError(f"cannot read {lib_path}: {err}") from err
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "little" if head[5] == 1 else "big"
    return _ELF_MACHINES.get(int.from_bytes(head[18:20], order))


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_emulated(
    lib_path: str | os.PathLike[str],
    inputs: Sequence[np.ndarray],
    threads: int | None = None,
    timeout: float = 600.0,
    emulator: Emulator | None = None,
    on_tick: Callable[[float], None] | None = None,
    entries: Sequence[tuple[str, Sequence[int]]] | None = None,
    kernels: tuple[str, str] | None = None,
    timings: dict[str, Any] | None = None,
) -> list[np.ndarray]:
    """Run ``main`` of a Relax library built for another CPU and return its outputs.

    ``inputs`` are the positional arguments of ``main`` (or, with ``entries``, of each named
    function in turn: the inputs at its indices; outputs are concatenated).  The result (a tensor or
    nested tuples of tensors) comes back flattened depth-first.  ``threads`` sets
    ``TVM_NUM_THREADS`` in the guest (default: inherited, else TVM's own choice).
    ``emulator`` defaults to :func:`find_emulator` for the library's ELF machine.
    ``on_tick(elapsed_s)`` is called about once a second while the guest runs (progress).
    ``kernels`` (``(arrays.npz, plan JSON)`` from :func:`.kernel_check.write_plan`) calls
    single kernels instead of ``main`` (``inputs`` unused), returning their written arguments;
    then ``timings`` (a dict), when given, receives where the guest's time went
    (:func:`_guest_timings`: start-up, imports, library load, kernels, the slowest kernel).
    Raises :class:`EmulatorUnavailable` when there is no emulator,
    :class:`EmulationTimeout` after ``timeout`` seconds, and :class:`EmulationError`
    (with the guest's stderr tail) when the run fails.
    """
    lib = Path(lib_path).resolve()
    if emulator is None:
        arch = _elf_arch(lib)
        if arch is None:
            known = ", ".join(sorted(_ELF_MACHINES.values()))
            raise EmulationError(f"{lib} is not an ELF library for an emulated CPU ({known})")
        emulator = find_emulator(f"{arch}-linux-gnu")
    if kernels is not None:
        with KernelGuest(emulator, threads) as guest:
            return guest.run(lib, kernels, timeout=timeout, on_tick=on_tick, timings=timings)
    guest_env: dict[str, str] = {}
    if threads is not None:
        guest_env["TVM_NUM_THREADS"] = str(int(threads))
    host_env = {k: v for k, v in os.environ.items() if k not in _HOST_ONLY_ENV}
    with tempfile.TemporaryDirectory(prefix="slimc-emu-") as tmp:
        in_path, out_path = Path(tmp, "inputs.npz"), Path(tmp, "outputs.npz")
        np.savez(in_path, **{f"arg{i}": np.asarray(a) for i, a in enumerate(inputs)})
        plan = [] if entries is None else [json.dumps([[f, list(ix)] for f, ix in entries])]
        cmd = emulator.command(str(_RUNNER), str(lib), str(in_path), str(out_path), *plan,
                               env=guest_env)
        # Guest output goes to a file, not a pipe: nothing has to drain it while we poll.
        log_path = Path(tmp, "guest.log")
        with open(log_path, "w+b") as log:
            code = _wait(cmd, host_env, log, timeout, on_tick, emulator)
            log.seek(0)
            guest_log = log.read().decode(errors="replace")
        if code is None:
            raise EmulationTimeout(
                f"emulated run of {lib.name} timed out after {timeout:g}s\n{_tail(guest_log)}",
                limit_s=timeout)
        if code != 0 or not out_path.is_file():
            raise EmulationError(
                f"emulated run of {lib.name} failed (exit {code}); stderr tail:\n"
                f"{_tail(guest_log)}"
            )
        _LOG.debug("%s under qemu: %s", lib.name, _tail(guest_log, 1))
        with np.load(out_path) as npz:
            return [npz[f"out{i}"] for i in range(len(npz.files))]


class KernelGuest:
    """The per-kernel check's guest (``emulated_runner.py - - - @-``), started before the host
    has built the library and recorded the kernels' arguments.

    Why: under qemu the guest's interpreter start, imports and TVM runtime load cost ~1.5-2.5 s
    of one core on an idle host (5-7 s on a loaded one; issue 18), while the build before the
    check runs on one core; started first, the guest gets there while the host works, then
    waits on its stdin. :meth:`run` hands it the library and the plan and waits at most
    ``timeout`` seconds from then on (the budget of the kernels' run). Use it as a context
    manager: leaving it stops a guest that was never handed a plan (the build or the host's
    half failed).
    """

    def __init__(self, emulator: Emulator, threads: int | None = None) -> None:
        self.emulator = emulator
        guest_env = {"TVM_NUM_THREADS": str(int(threads))} if threads is not None else {}
        host_env = {k: v for k, v in os.environ.items() if k not in _HOST_ONLY_ENV}
        self._tmp = tempfile.TemporaryDirectory(prefix="slimc-emu-")
        self._log = open(Path(self._tmp.name, "guest.log"), "w+b")  # noqa: SIM115 - close()
        cmd = emulator.command(str(_RUNNER), "-", "-", "-", "@-", env=guest_env)
        self.launched = time.time()
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._log,
                                          stderr=subprocess.STDOUT, env=host_env,
                                          **_GUEST_GROUP)
        except OSError as err:
            self.close()
            raise EmulationError(f"cannot start {emulator.qemu}: {err}") from err

    def run(self, lib_path: str | os.PathLike[str], kernels: tuple[str, str],
            timeout: float = 600.0, on_tick: Callable[[float], None] | None = None,
            timings: dict[str, Any] | None = None) -> list[np.ndarray]:
        """Hand the guest the library and ``kernels`` (``(arrays.npz, plan JSON)`` from
        :func:`.kernel_check.write_plan`) and return the written arguments; the errors of
        :func:`run_emulated`. ``timings`` receives where the guest's time went."""
        lib = Path(lib_path).resolve()
        plan_path = Path(self._tmp.name, "kernels.json")
        out_path = Path(self._tmp.name, "outputs.npz")
        plan_path.write_text(kernels[1])
        handed = time.time()
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(
                f"{lib}\n{kernels[0]}\n{out_path}\n{plan_path}\n".encode())
            self._proc.stdin.close()
        except OSError:  # the guest died during its start-up: its log says why (below)
            pass
        code = _wait_for(self._proc, timeout, on_tick)
        ended = time.time()
        self._log.seek(0)
        guest_log = self._log.read().decode(errors="replace")
        if code is None:
            raise EmulationTimeout(
                f"emulated run of {lib.name} timed out after {timeout:g}s\n"
                f"{_tail(guest_log)}", limit_s=timeout)
        if code != 0 or not out_path.is_file():
            raise EmulationError(
                f"emulated run of {lib.name} failed (exit {code}); stderr tail:\n"
                f"{_tail(guest_log)}")
        _LOG.debug("%s under qemu: %s", lib.name, _tail(guest_log, 1))
        if timings is not None:
            timings.update(_guest_timings(guest_log, self.launched, ended))
            timings["after_handoff"] = round(ended - handed, 2)
        with np.load(out_path) as npz:
            return [npz[f"out{i}"] for i in range(len(npz.files))]

    def close(self) -> None:
        """Stop the guest if it still runs; remove its files."""
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            _kill(proc)
        self._log.close()
        self._tmp.cleanup()

    def __enter__(self) -> KernelGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _guest_timings(log: str, launched: float, ended: float) -> dict[str, Any]:
    """Where a per-kernel guest run's wall seconds went, from the runner's stderr lines
    (``started T imported T``, one ``NAME Ss`` per kernel, ``load S kernels S (...) save S``);
    parts the log lacks are left out."""
    import re

    out: dict[str, Any] = {"total": round(ended - launched, 2)}
    stamps = re.search(r"slimc-runner: started ([\d.]+) imported ([\d.]+)", log)
    if stamps:
        started, imported = float(stamps.group(1)), float(stamps.group(2))
        out["interpreter_start"] = round(started - launched, 2)
        out["imports"] = round(imported - started, 2)
    waited = re.search(r"slimc-runner: waited ([\d.]+)s", log)
    if waited:
        out["waited_for_host"] = round(float(waited.group(1)), 2)
    summary = re.search(r"slimc-runner: load ([\d.]+)s kernels ([\d.]+)s .* save ([\d.]+)s", log)
    if summary:
        out["library_load"], out["kernels"], out["save"] = (
            round(float(v), 2) for v in summary.groups())
    runs = [(float(t), n) for n, t in re.findall(r"slimc-runner: (\S+) ([\d.]+)s$", log, re.M)
            if n not in ("load", "waited")]
    if runs:
        seconds, name = max(runs)
        out["slowest_kernel"], out["slowest_kernel_s"] = name, round(seconds, 2)
    return out


def _wait(cmd: list[str], env: dict[str, str], log, timeout: float,
          on_tick: Callable[[float], None] | None, emulator: Emulator) -> int | None:
    """Run ``cmd`` to completion or ``timeout``; its exit code, or None when it was stopped."""
    try:
        # no stdin: in a process group of its own, a guest reading the terminal would be stopped
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, **_GUEST_GROUP)
    except OSError as err:
        raise EmulationError(f"cannot start {emulator.qemu}: {err}") from err
    return _wait_for(proc, timeout, on_tick)


def _wait_for(proc: subprocess.Popen, timeout: float,
              on_tick: Callable[[float], None] | None) -> int | None:
    """Wait for ``proc`` up to ``timeout`` seconds from now; its exit code, or None when it
    was stopped (timed out, or the host was interrupted)."""
    start = time.monotonic()
    try:
        while True:
            elapsed = time.monotonic() - start
            if elapsed >= timeout:
                return None
            try:
                return proc.wait(timeout=min(1.0, timeout - elapsed))
            except subprocess.TimeoutExpired:
                if on_tick is not None:
                    on_tick(time.monotonic() - start)
    finally:
        if proc.poll() is None:
            _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
    """Stop the guest's whole process group (qemu and its threads)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
