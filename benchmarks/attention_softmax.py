"""SDPA attention alone, slimc's attention-softmax pass on vs off: per-kernel minimum times.

Builds ``scaled_dot_product_attention`` over q, k, v of ``1 x H x L x D`` with slimc's CPU
pipeline twice -- with :mod:`slimc.backends.tvm.schedules.attention_softmax` (one safe-softmax
kernel, keys padded to whole vectors) and without it (``ENABLED = False``: TVM's softmax plus the
all -inf row check kernel, with ``--pass-off``) and with the pass but its TE softmax instead of
the hand-written row kernel (``ROW_KERNEL = False``) -- checks each against PyTorch, and prints
each kernel's minimum and median over ``--calls`` calls (the VM instrument hook; every build in
one process):

    python benchmarks/attention_softmax.py --shape 6x1500x64 --threads 2

End-to-end times next to ONNX Runtime are left to ``run.py``: ORT's spinning thread pool slows
whatever runs right after it in one process.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def sdpa_case(heads: int, length: int, width: int):
    """``(module, (q, k, v), expected output)``: one SDPA of ``heads x length x width`` with
    seeded random inputs, the case both attention benchmarks time."""
    import torch

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    torch.manual_seed(0)
    inputs = tuple(torch.randn(1, heads, length, width) for _ in range(3))
    module = Attention().eval()
    with torch.no_grad():
        return module, inputs, module(*inputs).numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="6x1500x64", help="heads x length x head width")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--pass-off", action="store_true",
                   help="also build with the pass off (TVM's softmax + the -inf row check)")
    args = p.parse_args(argv)
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np
    import torch
    import tvm
    from slimc.backends.tvm.build import build_library
    from slimc.backends.tvm.schedules import attention_softmax
    from tvm.relax.frontend.torch import from_exported_program

    from slimc.targets import resolve_target

    heads, length, width = (int(v) for v in args.shape.split("x"))

    module, inputs, want = sdpa_case(heads, length, width)
    work = Path(tempfile.mkdtemp(prefix="slimc-attn-"))
    variants = [("row kernel", True, True), ("TE softmax", True, False), ("pass off", False, True)]
    for name, enabled, row_kernel in variants[:3 if args.pass_off else 2]:
        attention_softmax.ENABLED, attention_softmax.ROW_KERNEL = enabled, row_kernel
        try:
            mod = from_exported_program(torch.export.export(module, inputs),
                                        keep_params_as_input=False)
            lib = build_library(mod, resolve_target("llvm"), work / f"{name.replace(' ', '_')}.so")
        finally:
            attention_softmax.ENABLED = attention_softmax.ROW_KERNEL = True
        vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
        feed = [tvm.runtime.tensor(x.numpy()) for x in inputs]
        got = vm["main"](*feed)
        got = (got if hasattr(got, "numpy") else got[0]).numpy()
        err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        times: dict[str, list[float]] = collections.defaultdict(list)
        started: dict[str, float] = {}

        def instrument(func, symbol, before, ret, *call_args, times=times, started=started):
            if before:
                started[symbol] = time.perf_counter()
            else:
                times[symbol].append((time.perf_counter() - started.pop(symbol)) * 1e3)
            return 0

        vm.set_instrument(instrument)
        for _ in range(args.calls):
            vm["main"](*feed)
        print(f"{name}: relative L2 vs PyTorch {err:.2e}")
        for symbol, ms in sorted(times.items(), key=lambda kv: -min(kv[1])):
            if not symbol.startswith("vm.builtin"):
                print(f"  {min(ms):9.2f} ms min {np.median(ms):9.2f} ms median  {symbol}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
