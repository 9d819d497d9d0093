"""Matmul kernels at a fixed vs a symbolic (dynamic) length, with and without tile padding.

slimc's ``TiledMatmul`` rule pads a symbolic rows/columns axis to whole tiles (``pad_einsum``)
instead of predicating every micro-kernel step. This times one MiniLM-sized dense layer and
one attention-score batched matmul three ways, interleaved in one process:

    python benchmarks/symbolic_kernels.py --length 128 --threads 1

``fixed``: compiled for exactly ``--length``; ``predicated``: symbolic length, padding off;
``padded``: symbolic length, slimc's default. Prints best-of-N times and ratios to ``fixed``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def kernel(kind: str, m, hidden: int = 384, ffn: int = 1536, heads: int = 12, head_dim: int = 32):
    from tvm import te

    if kind == "dense":
        x = te.placeholder((m, hidden), "float32", name="x")
        w = te.placeholder((hidden, ffn), "float32", name="w")
        r = te.reduce_axis((0, hidden), name="k")
        y = te.compute((x.shape[0], ffn), lambda i, j: te.sum(x[i, r] * w[r, j], axis=r),
                       name="y")
        return te.create_prim_func([x, w, y], index_dtype_override="int64")
    q = te.placeholder((heads, m, head_dim), "float32", name="q")
    k = te.placeholder((heads, head_dim, m), "float32", name="k")
    r = te.reduce_axis((0, head_dim), name="d")
    y = te.compute((heads, q.shape[1], k.shape[2]),
                   lambda h, i, j: te.sum(q[h, i, r] * k[h, r, j], axis=r), name="y")
    return te.create_prim_func([q, k, y], index_dtype_override="int64")


def build(func, target, pad: bool):
    import tvm
    from slimc.backends.tvm.schedules import cpu_matmul

    cpu_matmul.PAD_SYMBOLIC_TILES = pad
    sch = cpu_matmul.TiledMatmul().apply(func, target)
    main = sch.mod["main"].with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": main}), target=target)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import tvm
    from tvm import tirx

    from slimc.targets import resolve_target

    target = resolve_target("llvm").tvm_target()
    length = args.length
    rng = np.random.default_rng(0)
    for kind in ("dense", "attention"):
        symbolic = tirx.Var("m", "int64")
        libs = {"fixed": build(kernel(kind, length), target, True),
                "predicated": build(kernel(kind, symbolic), target, False),
                "padded": build(kernel(kind, tirx.Var("m", "int64")), target, True)}
        if kind == "dense":
            shapes = [(length, 384), (384, 1536), (length, 1536)]
        else:
            shapes = [(12, length, 32), (12, 32, length), (12, length, length)]
        inputs = [rng.standard_normal(s).astype("float32") for s in shapes[:-1]]
        outputs = {}
        for name, lib in libs.items():
            args_ = [tvm.runtime.tensor(a) for a in inputs] + [
                tvm.runtime.tensor(np.zeros(shapes[-1], "float32"))]
            lib["main"](*args_)
            outputs[name] = args_[-1].numpy()
            assert np.allclose(outputs[name], outputs["fixed"], atol=1e-3), name
        times = {name: [] for name in libs}
        tensors = [tvm.runtime.tensor(a) for a in inputs] + [
            tvm.runtime.tensor(np.zeros(shapes[-1], "float32"))]
        for _ in range(args.repeats):
            for name, lib in libs.items():
                start = time.perf_counter()
                lib["main"](*tensors)
                times[name].append(time.perf_counter() - start)
        best = {name: min(v) * 1e3 for name, v in times.items()}
        print(f"{kind:9} L={length}: " + ", ".join(
            f"{n} {t:.3f} ms ({t / best['fixed']:.2f}x)" for n, t in best.items()))
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
