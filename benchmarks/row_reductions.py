"""Row reductions (layer norm, RMS norm, softmax) alone: slimc's kernel vs ONNX Runtime.

The transformer workloads lost to ONNX Runtime on these kernels: a row reduction written as
``acc = acc + x[i]`` is a scalar dependency chain (LLVM may not reassociate float adds).
``RowReduction`` now sums a row in vector lanes with independent accumulators (``rfactor``).
This builds each kernel twice -- ``slimc`` (lanes) and ``slimc-scalar`` (the old scalar chain,
``cpu_reduction.ACCUMULATORS = 0``) -- plus an ONNX Runtime session of the same op, checks all
three against PyTorch, and times them interleaved in one process:

    python benchmarks/row_reductions.py --threads 2

Prints the median microseconds per call and the ratios to ONNX Runtime.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

#: name -> (op, input shape): the shapes of ViT-Small, BERT/MiniLM, Whisper-tiny and SmolLM2.
KERNELS = {
    "layernorm-vit": ("layernorm", (1, 197, 384)),
    "layernorm-bert": ("layernorm", (1, 128, 768)),
    "layernorm-whisper": ("layernorm", (1, 1500, 384)),
    "rmsnorm-smollm2": ("rmsnorm", (1, 128, 576)),
    "softmax-vit": ("softmax", (1, 6, 197, 197)),
    "softmax-bert": ("softmax", (1, 12, 128, 128)),
    "softmax-whisper": ("softmax", (1, 6, 1500, 1500)),
}


def module_for(op: str, width: int):
    import torch

    class Row(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = {"layernorm": torch.nn.LayerNorm(width),
                         "rmsnorm": torch.nn.RMSNorm(width, eps=1e-6)}.get(op)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x, -1) if op == "softmax" else self.norm(x)

    return Row().eval()


def build(module, x, path: Path, accumulators: int):
    import torch
    from slimc.backends.tvm.build import build_library
    from slimc.backends.tvm.schedules import cpu_reduction
    from tvm.relax.frontend.torch import from_exported_program

    from slimc.targets import resolve_target

    saved, cpu_reduction.ACCUMULATORS = cpu_reduction.ACCUMULATORS, accumulators
    try:
        mod = from_exported_program(torch.export.export(module, (x,)),
                                    keep_params_as_input=False)
        library = build_library(mod, resolve_target("llvm"), path)
    finally:
        cpu_reduction.ACCUMULATORS = saved
    return library


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kernels", default=",".join(KERNELS),
                   help="comma list of " + ",".join(KERNELS))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=10, help="calls per engine per round")
    p.add_argument("--best", action="store_true",
                   help="report the best round, not the median (exploring on a loaded host)")
    args = p.parse_args(argv)
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np
    import torch
    from run import _ort_session
    from slimc.backends.tvm.runtime import NativeRunner

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="slimc-rows-"))
    print(f"{'kernel':20} {'shape':18} {'slimc us':>9} {'scalar us':>9} {'ORT us':>8} "
          f"{'slimc/ORT':>9} {'scalar/ORT':>10} {'slimc err':>9} {'ORT err':>8}")
    for name in [k for k in args.kernels.split(",") if k]:
        op, shape = KERNELS[name]
        module = module_for(op, shape[-1])
        x = torch.randn(*shape)
        with torch.no_grad():
            want = module(x).numpy()
        feed = [x.numpy()]
        engines = {}
        for engine, acc in (("slimc", None), ("slimc-scalar", 0)):
            from slimc.backends.tvm.schedules import cpu_reduction

            lib = build(module, x, work / f"{name}-{engine}.so",
                        cpu_reduction.ACCUMULATORS if acc is None else acc)
            runner = NativeRunner(lib, args.threads)
            engines[engine] = lambda runner=runner, feed=feed: runner(feed)[0]
        session = _ort_session(module, {"x": x}, args.threads, work / f"{name}.onnx")
        engines["ort"] = lambda session=session, feed=feed: session.run(None, {"x": feed[0]})[0]
        err = {e: float(np.abs(fn() - want).max()) for e, fn in engines.items()}
        times = {e: [] for e in engines}
        order = list(engines)
        for r in range(args.rounds):
            for e in order[r % 3:] + order[:r % 3]:
                fn = engines[e]
                fn()
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                times[e].append((time.perf_counter() - t0) / args.calls * 1e6)
        med = {e: (min if args.best else statistics.median)(v) for e, v in times.items()}
        print(f"{name:20} {'x'.join(map(str, shape)):18} {med['slimc']:9.1f} "
              f"{med['slimc-scalar']:9.1f} {med['ort']:8.1f} {med['slimc'] / med['ort']:9.2f} "
              f"{med['slimc-scalar'] / med['ort']:10.2f} {err['slimc']:9.1e} {err['ort']:8.1e}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
