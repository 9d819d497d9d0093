"""W8A8 int8 matmul kernels on an AVX2 target: the generic kernel vs AVX2 ``vpmaddwd``.

Both built for ``--target x86-64-v3`` (AVX2, no AVX-512: what Haswell to Zen 3 run), timed
interleaved in one process on the same random codes (median ms per call), and checked equal to
each other (both are exact). Shapes: im2col / pointwise matmuls of ResNet-18 and MobileNetV2
(rows = output pixels, K = kh * kw * C_in, N = C_out).

    python benchmarks/int8_dot_kernels.py [--threads 2] [--rounds 15] [--kinds generic,avx2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (m, k, n): ResNet 3x3 56x56 64->128 (im2col), ResNet 3x3 7x7 512->512, MobileNetV2
#: pointwise expand 56x56 24->144, project 14x14 384->64, expand 112x112 16->96.
SHAPES = [(3136, 576, 128), (52, 4608, 512), (3136, 24, 144), (196, 384, 64),
          (12544, 16, 96)]


def _build(kind: str, m: int, k: int, n: int, target):
    import tvm
    from slimc.backends.tvm import int8_kernels as ik
    from slimc.backends.tvm.quantized_ops import tile_for

    rng = np.random.default_rng(0)
    aq = rng.integers(-128, 128, (m, k)).astype(np.int8)
    wq = rng.integers(-127, 128, (n, k)).astype(np.int8)
    if kind == "generic":
        t = tile_for(n)
        func = ik.generic_kernel(m, k, n, t)
        packed = wq.reshape(n // t, t, k).transpose(0, 2, 1)
    else:
        lanes, g = ik.lanes(kind), ik.group(kind)
        func = ik.dot_kernel(kind, m, k, n)
        packed = wq.reshape(n // lanes, lanes, k // g, g).transpose(0, 2, 1, 3)
    a = aq.astype(ik.activation_dtype(kind))
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    fn = lib[str(func.attrs["global_symbol"])]
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.ascontiguousarray(x), dev) for x in (
        a, packed, np.zeros(n, np.int32), np.ones(n, np.float32), np.zeros(n, np.float32))]
    out = tvm.runtime.tensor(np.zeros((m, n), np.float32), dev)
    return lambda: fn(*args, out), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--kinds", default="generic,avx2", help="int8 kernel kinds compared")
    args = p.parse_args()
    kinds = args.kinds.split(",")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from slimc.targets import resolve_target

    target = resolve_target("x86-64-v3").tvm_target()
    print(f"x86-64-v3, {args.threads} thread(s): median ms per call")
    print("| m x k x n | " + " | ".join(f"{k} ms" for k in kinds) + " | "
          + " | ".join(f"{k} / {kinds[-1]}" for k in kinds[:-1]) + " |")
    print("|---|" + "---:|" * (2 * len(kinds) - 1))
    for m, k, n in SHAPES:
        runs = {kind: _build(kind, m, k, n, target) for kind in kinds}
        results = {kind: out for kind, (_, out) in runs.items()}
        times: dict[str, list[float]] = {kind: [] for kind in runs}
        for fn, _ in runs.values():
            for _ in range(3):
                fn()
        for _ in range(args.rounds):
            for kind, (fn, _) in runs.items():
                t0 = time.perf_counter()
                fn()
                times[kind].append((time.perf_counter() - t0) * 1e3)
        for kind in kinds[1:]:
            np.testing.assert_array_equal(results[kinds[0]].numpy(), results[kind].numpy())
        med = [float(np.median(times[kind])) for kind in kinds]
        print(f"| {m}x{k}x{n} | " + " | ".join(f"{t:.3f}" for t in med) + " | "
              + " | ".join(f"{t / med[-1]:.2f}x" for t in med[:-1]) + " |", flush=True)


if __name__ == "__main__":
    main()
