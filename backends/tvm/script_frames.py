"""TVMScript parsing without paying ``inspect.stack()``'s module search on every frame.

``T.prim_func`` (TVM's TVMScript decorator) calls ``inspect.stack()`` to resolve the names a
kernel closes over. For every outer frame ``inspect.getmodule`` looks the frame's file up and,
when no module owns it (importlib's frozen frames sit on every import's stack), loops over all
of ``sys.modules``. With torch and transformers loaded that is ~2,200 modules per frame, per
kernel: importing ``tvm.s_tir.tensor_intrin`` (hundreds of GPU tensor-core intrinsics, which
dlight's GPU matmul rule imports on first use) took 164-171 s on a loaded 2-core host, and
13 s with the lookup memoised by file name (``docs/benchmarks.md``, "CUDA builds: TVMScript's
frame lookups"). Every CUDA compile paid it once per process.

The memo is exact for what ``inspect`` asks on these paths: for a frame or code object
``getmodule(obj, filename)`` depends only on ``filename`` (frames have no ``__module__`` or
``__name__``). It is installed only while TVM parses or builds (:func:`memoised_frame_modules`)
and removed afterwards.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

_lock = threading.Lock()
_depth = 0
_original = inspect.getmodule


def _memoising(original):
    memo: dict[str, ModuleType | None] = {}

    def getmodule(obj, _filename=None):
        if _filename is None or inspect.ismodule(obj) or hasattr(obj, "__module__"):
            return original(obj, _filename)
        try:
            return memo[_filename]
        except KeyError:
            module = memo[_filename] = original(obj, _filename)
            return module

    return getmodule


@contextmanager
def memoised_frame_modules() -> Iterator[None]:
    """``inspect.getmodule`` memoised by file name for frame lookups inside this block
    (re-entrant: nested blocks share the outermost one's memo)."""
    global _depth
    with _lock:
        if _depth == 0:
            inspect.getmodule = _memoising(_original)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                inspect.getmodule = _original


def import_tvm_script_module(name: str) -> ModuleType:
    """Import a module that parses TVMScript at import time (TVM's tensor intrinsics) with
    the frame lookups memoised."""
    with memoised_frame_modules():
        return importlib.import_module(name)
