"""What a compile read: the inputs that make up an artifact's identity, and the depfile.

Two sources, because neither alone is complete:

* *declared* inputs, hashed before any work starts: the model's files (every file of a Hugging
  Face directory, the ``.pt2``, the factory's source file), the recipe, the calibration data and
  the tuning database, plus the options, versions and slimc's own source;
* *observed* reads: every file Python opens while the compile runs (a ``sys.addaudithook``
  ``open`` hook), so a factory that reads a weight file of its own, or a tokenizer found through
  the config, is listed too. Files under the Python installation and slimc's own source (covered
  by its hash) are left out. Native code that opens files without Python (safetensors' Rust
  reader, TVM) is covered by the declared list.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import sysconfig
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_recorders: list[set[str]] = []
_hook_lock = threading.Lock()
_hook_installed = False


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _recorders and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        for recorder in _recorders:
            recorder.add(path)


@contextmanager
def record_reads() -> Iterator[set[str]]:
    """Collect the paths Python code opens inside the ``with`` block."""
    global _hook_installed
    with _hook_lock:
        if not _hook_installed:  # audit hooks cannot be removed: install one, once
            sys.addaudithook(_audit)
            _hook_installed = True
    paths: set[str] = set()
    _recorders.append(paths)
    try:
        yield paths
    finally:
        _recorders.remove(paths)


def _excluded_roots() -> list[str]:
    import slimc.backends
    import slimc.passes

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, "/proc", "/sys", "/dev", "/etc",
             "/usr"}
    roots.update(str(Path(m.__file__).resolve().parent)
                 for m in (sys.modules["slimc"], slimc.passes, slimc.backends))
    roots.update(p for p in sysconfig.get_paths().values() if p)
    roots.update(p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages")))
    return [os.path.realpath(r).rstrip("/") + "/" for r in roots if r]


def user_files(paths: Iterable[str], exclude: Iterable[Path] = ()) -> list[Path]:
    """The regular files among ``paths`` that are the user's (not Python's, not slimc's, not
    scratch or output), resolved, sorted."""
    roots = _excluded_roots() + [os.path.realpath(p).rstrip("/") + "/" for p in exclude]
    kept = set()
    for raw in paths:
        try:
            real = os.path.realpath(raw)
        except (OSError, ValueError):
            continue
        if any(real.startswith(r) for r in roots) or not os.path.isfile(real) \
                or any(part.endswith((".dist-info", ".egg-info")) or part == "__pycache__"
                       for part in Path(real).parts):
            continue
        kept.add(Path(real))
    return sorted(kept)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def files_under(path: Path) -> list[Path]:
    """A file, or every file in a folder (recursively, hidden files and caches left out)."""
    if path.is_file():
        return [path.resolve()]
    if not path.is_dir():
        return []
    return sorted(p.resolve() for p in path.rglob("*")
                  if p.is_file() and not any(part.startswith(".") or part == "__pycache__"
                                             for part in p.relative_to(path).parts))


def model_files(model: str) -> list[Path]:
    """The files a MODEL argument names: an HF folder's files, a ``.pt2``, a factory's source."""
    path = Path(model)
    if path.exists():
        return files_under(path)
    module, sep, _ = model.rpartition(":")
    if not sep:
        return []
    if module.endswith(".py") or "/" in module:
        return files_under(Path(module))
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    origin = getattr(spec, "origin", None) if spec else None
    return [Path(origin).resolve()] if origin and os.path.isfile(origin) else []


def hash_files(files: Iterable[Path]) -> dict[str, str]:
    return {str(f): sha256_file(f) for f in files}


_SOURCE_HASH: str | None = None


def slimc_source_hash() -> str:
    """Hash of slimc's own code and data files: a changed compiler is a changed input, even
    when the version number is not bumped (editable installs). Includes the C runner and CMake
    files that ``--bundle`` copies and builds into the artifact."""
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        import slimc
        import slimc.backends
        import slimc.passes

        digest = hashlib.sha256()
        for package in (slimc, slimc.passes, slimc.backends):
            root = Path(package.__file__).parent
            for f in sorted(root.rglob("*")):
                if "__pycache__" not in f.parts and (
                        f.suffix in (".py", ".toml", ".json", ".c", ".cmake")
                        or f.name == "CMakeLists.txt"):
                    digest.update(str(f.relative_to(root)).encode() + b"\0")
                    digest.update(f.read_bytes())
        _SOURCE_HASH = digest.hexdigest()
    return _SOURCE_HASH


def digest_of(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def write_depfile(path: Path, target: Path, files: Iterable[Path]) -> None:
    """A Make-syntax depfile: ``target: dep dep ...`` (spaces escaped), one dep per line."""
    def esc(p: Path) -> str:
        return str(p).replace("\\", "\\\\").replace(" ", "\\ ").replace("#", "\\#") \
            .replace("$", "$$")

    deps = sorted({str(Path(f).resolve()) for f in files})
    lines = [f"{esc(target)}:"] + [f" {esc(Path(d))}" for d in deps]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(" \\\n".join(lines) + "\n")
    os.replace(tmp, path)
