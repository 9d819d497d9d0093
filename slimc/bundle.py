"""``--bundle``: put what a board needs to run the artifact without Python or slimc into
``OUT/runtime/``:

* ``libtvm_runtime.so`` and ``libtvm_ffi.so`` for the target's triple: for the host, from the
  installed apache-tvm / apache-tvm-ffi wheels; for aarch64, from the sysroot that
  ``.ci/aarch64-sysroot.sh`` assembles out of the aarch64 wheels of the same versions;
* ``slimc_run``: a small C runner (``slimc_run.c``, with a ``CMakeLists.txt`` to rebuild it on
  the board), prebuilt for the triple with ``python -m ziglang cc`` and an ``$ORIGIN`` rpath,
  so ``runtime/slimc_run model.so OUTDIR in0.npy ...`` works as copied.

The bundle is opt-in (``--bundle``): it adds ~6 MB and a few seconds of zig per compile, and an
artifact that only ever runs under slimc (or next to an installed TVM runtime) does not need it.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from slimc.errors import UsageError

RUNNER_DIR = Path(__file__).resolve().parent / "runner"
LIBRARIES = ("libtvm_runtime.so", "libtvm_ffi.so")


def _package_dir(name: str, site: Path | None) -> Path:
    if site is not None:
        return site / name
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"--bundle needs the {name} package installed.")
    return Path(list(spec.submodule_search_locations)[0])


def runtime_libraries(cross_triple: str | None) -> list[Path]:
    """The TVM runtime libraries for ``cross_triple`` (None: this machine)."""
    site = None
    if cross_triple:
        from slimc.backends.tvm.emulation import EmulatorUnavailable, find_emulator

        try:
            site = find_emulator(cross_triple).site_packages
        except EmulatorUnavailable as exc:
            raise UsageError(f"--bundle for {cross_triple} needs that platform's TVM runtime: "
                             f"{exc}.", hint="Run .ci/aarch64-sysroot.sh once (it unpacks the "
                             "aarch64 apache-tvm wheels), or drop --bundle.") from None
    found = []
    for lib, package in zip(LIBRARIES, ("tvm", "tvm_ffi"), strict=True):
        root = _package_dir(package, site)
        candidates = [root / sub / lib for sub in ("lib", "lib64", "")]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise UsageError(f"--bundle: {lib} not found under {root}.")
        found.append(path)
    return found


def build_runner(output: Path, triple: str, libdir: Path) -> None:
    """Compile slimc_run.c for ``triple`` with zig, linked against the bundled libraries."""
    include = _package_dir("tvm_ffi", None) / "include"
    cmd = [sys.executable, "-m", "ziglang", "cc", "-target", _zig_triple(triple), "-std=c11",
           "-O2", f"-I{include}", f"-I{include / 'dlpack'}", str(RUNNER_DIR / "slimc_run.c"),
           "-o", str(output), f"-L{libdir}", "-Wl,--no-as-needed", "-ltvm_runtime",
           "-ltvm_ffi", "-Wl,-rpath,$ORIGIN"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UsageError(f"--bundle: building the C runner for {triple} failed: "
                         f"{proc.stderr.strip()[-800:]}")


def _zig_triple(triple: str) -> str:
    arch = triple.split("-")[0]
    return f"{arch}-linux-gnu.2.28"


def write_bundle(stage_dir: Path, cross_triple: str | None) -> list[str]:
    """Fill ``stage_dir/runtime``; returns the files written (relative to ``stage_dir``)."""
    import platform

    runtime = stage_dir / "runtime"
    runtime.mkdir()
    for lib in runtime_libraries(cross_triple):
        shutil.copy(lib, runtime / lib.name)
    for name in ("slimc_run.c", "CMakeLists.txt"):
        shutil.copy(RUNNER_DIR / name, runtime / name)
    triple = cross_triple or f"{platform.machine()}-linux-gnu"
    build_runner(runtime / "slimc_run", triple, runtime)
    return sorted(str(p.relative_to(stage_dir)) for p in runtime.iterdir())
