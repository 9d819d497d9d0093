"""int8 weight kernel: one row at a time vs blocks of rows sharing each converted weight.

Two measurements, each interleaving the two kernels in one process:

- native (this host, x86 ``x86-64-v3``): median ms per call of ``linear_int8`` at prefill-sized
  shapes (SmolLM2-135M's projections, 64 rows), single-threaded;
- emulated (the ``--target arm`` build of a 3-layer MLP, 64 rows, 1.6 GFLOP, int8 weights, run
  under qemu-aarch64): CPU seconds of the emulated run, the cost of verifying a cross artifact.

    python benchmarks/int8_row_blocks.py [--skip-emulated]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TVM_NUM_THREADS", "1")

SHAPES = [(64, 576, 1536), (64, 1536, 576), (64, 576, 576), (8, 576, 1536), (1, 576, 1536)]


def _kernel(row_block: int, m: int, k: int, n: int):
    from slimc.backends.tvm import quantized_ops as q

    saved = q.ROW_BLOCK
    q.ROW_BLOCK = row_block
    q.linear_kernel.cache_clear()
    try:
        return q.linear_kernel("int8", m, k, n)
    finally:
        q.ROW_BLOCK = saved
        q.linear_kernel.cache_clear()


def native(rounds: int = 7) -> None:
    import tvm
    from slimc.backends.tvm import quantized_ops as q

    from slimc.targets import resolve_target

    target, dev = resolve_target("x86").tvm_target(), tvm.cpu()
    print("native, 1 thread: median ms per call (per-row / blocked)")
    for m, k, n in SHAPES:
        t = q.tile_for(n, "int8")
        rng = np.random.default_rng(0)
        arrays = [rng.standard_normal((m, k), dtype="float32"),
                  rng.integers(-127, 128, (n // t, k, t)).astype("int8"),
                  rng.random(n, dtype="float32"), np.zeros((m, n), "float32")]
        runs, outs = {}, {}
        for name, block in (("per-row", 1), ("blocked", q.ROW_BLOCK)):
            lib = tvm.tirx.build(tvm.IRModule({"main": _kernel(block, m, k, n)}), target=target)
            args = [tvm.runtime.tensor(a, dev) for a in arrays]
            lib["main"](*args)
            outs[name] = args[-1].numpy()
            runs[name] = (lib.time_evaluator("main", dev, number=20, repeat=1), args)
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, (timer, args) in runs.items():
                times[name].append(timer(*args).mean * 1e3)
        med = {name: float(np.median(v)) for name, v in times.items()}
        same = np.array_equal(outs["per-row"], outs["blocked"])
        print(f"  {m}x{k}x{n}: {med['per-row']:.3f} / {med['blocked']:.3f} ms = "
              f"{med['per-row'] / med['blocked']:.2f}x (outputs identical: {same})", flush=True)


def emulated() -> None:
    import torch
    from slimc.backends.tvm import emulation
    from slimc.backends.tvm import quantized_ops as q

    import slimc

    torch.manual_seed(0)
    layers = [torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(),
                                  torch.nn.Linear(2048, 1024)) for _ in range(3)]
    model = torch.nn.Sequential(*layers).eval()
    x = torch.randn(1, 64, 1024)
    saved = q.ROW_BLOCK
    with tempfile.TemporaryDirectory() as tmp:
        libs = {}
        for name, block in (("per-row", 1), ("blocked", saved)):
            q.ROW_BLOCK = block
            q.linear_kernel.cache_clear()
            out = Path(tmp, name)
            slimc.compile(model, (x,), target="arm", output=out, emulate="require",
                          pipeline="quantize{weights=int8}", cache=False)
            libs[name] = out / "model.so"
        q.ROW_BLOCK = saved
        print("emulated (qemu-aarch64), MLP 1.6 GFLOP, int8 weights: CPU s per run")
        for name in ("per-row", "blocked", "per-row", "blocked"):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.time()
            emulation.run_emulated(libs[name], [x.numpy()], threads=1, timeout=1800)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            print(f"  {name}: {cpu:.1f} CPU s ({time.time() - start:.0f} s wall, load "
                  f"{os.getloadavg()[0]:.1f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-emulated", action="store_true")
    args = parser.parse_args()
    native()
    if not args.skip_emulated:
        emulated()


if __name__ == "__main__":
    main()
