"""How long importing TVM's GPU tensor intrinsics takes in a process that has torch and
transformers loaded, with and without slimc's memoised frame lookup (``script_frames.py``).

    python benchmarks/tvmscript_import.py plain      # TVM as is
    python benchmarks/tvmscript_import.py memoised   # inside memoised_frame_modules()

One mode per process (the import happens once per process).
"""

from __future__ import annotations

import importlib
import sys
import time

import torch  # noqa: F401  (the modules a compile has loaded)
import transformers  # noqa: F401
import tvm  # noqa: F401
from slimc.backends.tvm.script_frames import memoised_frame_modules

NAME = "tvm.s_tir.tensor_intrin.cuda"

if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "memoised"
    started = time.perf_counter()
    if mode == "plain":
        importlib.import_module(NAME)
    else:
        with memoised_frame_modules():
            importlib.import_module(NAME)
    print(f"{mode}: import {NAME} {time.perf_counter() - started:.1f} s "
          f"with {len(sys.modules)} modules loaded")
