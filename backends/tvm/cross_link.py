"""Link TVM-built object files into a foreign-architecture shared library with zig.

Why this exists: ``Executable.export_library`` writes the host code of a module
as object files for the *target* (e.g. aarch64) and then hands them to an
``fcompile`` callable that must produce the final ``.so``.  The default
(``tvm.support.cc.create_shared``) calls the host's ``g++``, which cannot link
aarch64 objects.  ``ziglang`` is a pip-installable clang/lld bundle that ships
libc stubs for every glibc target, so it can link an aarch64 Linux shared
library on any host without a cross toolchain or sysroot.

Usage::

    ex = tvm.relax.build(mod, target={"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    ex.export_library("model.so", fcompile=zig_cross_compiler("aarch64-linux-gnu"))
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["CrossLinkError", "ZigCompile", "zig_cross_compiler"]

_CXX_SOURCES = (".cc", ".cpp", ".cxx")
_C_SOURCES = (".c",)


class CrossLinkError(RuntimeError):
    """Raised when zig fails to link; the message holds the command and its output."""


class ZigCompile(Protocol):
    """The ``fcompile`` protocol TVM's ``export_library`` relies on."""

    output_format: str

    def __call__(
        self,
        output: str,
        objects: Sequence[str] | str,
        options: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None: ...

    def get_target_triple(self) -> str: ...


def _zig_triple(triple: str) -> str:
    """Map an LLVM triple (``aarch64-unknown-linux-gnu``) to zig's form (``aarch64-linux-gnu``).

    zig rejects the vendor field that LLVM triples usually carry, so it is dropped.
    """
    parts = triple.split("-")
    if len(parts) == 4:
        parts = [parts[0], *parts[2:]]
    return "-".join(parts)


def _expand_tars(objects: list[str], workdir: str) -> list[str]:
    """Unpack any ``.tar`` inputs: some TVM modules export several objects as one tar."""
    files: list[str] = []
    for index, path in enumerate(objects):
        if not path.endswith(".tar"):
            files.append(path)
            continue
        dest = os.path.join(workdir, f"tar{index}")
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            for member in members:
                member.name = os.path.basename(member.name)  # flat, no path escapes
            # "data" filter where available (3.12+, backported to 3.10.12/3.11.4).
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **safe)
        files += sorted(os.path.join(dest, m.name) for m in members)
    return files


def zig_cross_compiler(
    triple: str = "aarch64-linux-gnu",
    options: Sequence[str] = (),
    *,
    glibc: str | None = None,
    timeout: float = 600.0,
) -> ZigCompile:
    """Return an ``fcompile`` for ``export_library`` that links with ``python -m ziglang``.

    ``triple`` is an LLVM-style target triple; it should match the ``mtriple`` the
    module was built for.  ``glibc`` (e.g. ``"2.28"``) pins the oldest glibc the
    library may require; zig's default is used otherwise.  ``options`` are extra
    flags appended to every link (e.g. ``["-s"]`` to strip debug info).

    TVM passes the host module's objects (``lib0.o``) plus ``devc.o`` holding the
    packed imports (the Relax bytecode).  Objects are linked with ``zig cc`` so no
    C++ runtime is dragged in (TVM's codegen only calls C symbols; the TVM/FFI
    symbols stay undefined and are resolved by ``libtvm_runtime`` at load time).
    ``zig c++`` is used only when a C++ source module is among the inputs.  The
    first link for a new target builds zig's libc stubs (~20 s, ~50 s for c++);
    later links hit zig's cache (``ZIG_GLOBAL_CACHE_DIR``, default ``~/.cache/zig``).
    """
    ztriple = _zig_triple(triple) + (f".{glibc}" if glibc else "")
    base_options = list(options)

    def fcompile(
        output: str,
        objects: Sequence[str] | str,
        options: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        # ``kwargs`` may carry keys meant for tvm's cc (e.g. ``cc``); they do not apply.
        files = [objects] if isinstance(objects, str) else list(objects)
        with tempfile.TemporaryDirectory(prefix="slimc-zig-") as workdir:
            files = _expand_tars(files, workdir)
            driver = "c++" if any(f.endswith(_CXX_SOURCES) for f in files) else "cc"
            cmd = [sys.executable, "-m", "ziglang", driver, "-target", ztriple]
            cmd += ["-shared", "-fPIC", "-o", os.fspath(output)]
            if any(f.endswith(_CXX_SOURCES + _C_SOURCES) for f in files):
                cmd += ["-O2"]
            cmd += base_options + list(options or ()) + files
            try:
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=timeout, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as err:
                raise CrossLinkError(
                    f"could not run zig to link {output} for {ztriple}: {err}\n"
                    f"command: {' '.join(cmd)}"
                ) from err
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).strip()
            hint = ""
            if "No module named ziglang" in out:
                hint = "\nhint: pip install ziglang"
            raise CrossLinkError(
                f"zig failed to link {output} for {ztriple} (exit {proc.returncode}):\n"
                f"{out}\ncommand: {' '.join(cmd)}{hint}"
            )

    def get_target_triple() -> str:
        return triple

    fc: Any = fcompile
    fc.output_format = "so"
    fc.get_target_triple = get_target_triple
    return fc
