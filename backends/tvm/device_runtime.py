"""Load TVM's device runtime (``libtvm_runtime_cuda.so``, ...) when ``import tvm`` did not.

Why this exists: apache-tvm 0.27 ships each GPU runtime as a sidecar library beside
``libtvm_runtime.so``, and ``import tvm`` loads the sidecars only when the compiler library
loads too (``tvm/backend/_autoload_backends.py`` skips the built-in backends in runtime-only
mode). A deployment machine that holds TVM's runtime alone -- the package without the 259 MB
``libtvm_compiler.so``, which running an artifact never needs -- would then see no CUDA device
and refuse every CUDA artifact. The sidecar also needs ``libcudart.so.13``; pip's CUDA runtime
(``nvidia-cuda-runtime``, the one PyTorch's CUDA builds use) keeps it off the loader's path, so
when PyTorch has not loaded it already it is looked up in the ``nvidia`` packages.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path


def load_device_runtime(kind: str) -> bool:
    """Make sure TVM's runtime library for device ``kind`` (``"cuda"``...) is loaded.

    Returns True when it is (loaded before or now), False when this TVM has no such library
    or it cannot load here (no driver): then the device simply does not exist for TVM."""
    from tvm import base

    name = f"tvm_runtime_{kind}"
    if name in base._LOADED_LIBS:
        return True
    runtime_dir = Path(base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    if not (runtime_dir / f"lib{name}.so").exists():
        return False
    for attempt in range(2):
        try:
            base._LOADED_LIBS[name] = ctypes.CDLL(str(runtime_dir / f"lib{name}.so"),
                                                  mode=ctypes.RTLD_LOCAL)
            return True
        except OSError:
            if attempt or kind != "cuda" or not _preload_pip_cudart():
                return False
    return False


def _preload_pip_cudart() -> bool:
    """Load ``libcudart.so.*`` from pip's ``nvidia`` packages globally (so the CUDA sidecar's
    ``DT_NEEDED`` entry resolves to it); False when none is installed or none loads."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return False
    for root in spec.submodule_search_locations:
        for library in sorted(Path(root).glob("*/lib/libcudart.so.*"), reverse=True):
            try:
                ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
                return True
            except OSError:
                continue
    return False
