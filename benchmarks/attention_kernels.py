"""Attention kernels at a symbolic (dynamic) length next to their fixed-length versions.

Builds each op of MiniLM-shaped attention (12 heads of width 32) alone as a Relax module with
slimc's CPU pipeline, once for a fixed length L and once for a symbolic length ``n <= 512``, and
times both on the same inputs, interleaved, minimum of ``--calls`` (1 thread by default): the
attention scores ``Q @ K^T``, the context product ``P @ V``, the mask add and the softmax.

    python benchmarks/attention_kernels.py --length 256 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HEADS, WIDTH = 12, 32
OPS = ("scores", "context", "maskadd", "softmax")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=60)
    p.add_argument("--ops", default=",".join(OPS))
    return p.parse_args(argv)


def module(op: str, n):
    from tvm import relax

    h, d = HEADS, WIDTH
    shapes = {"scores": ((h, n, d), (h, d, n)), "context": ((h, n, n), (h, n, d)),
              "maskadd": ((1, h, n, n), (1, 1, n, n)), "softmax": ((1, h, n, n), (1, h, n, n))}
    (sa, sb) = shapes[op]
    a = relax.Var("a", relax.TensorType(sa, "float32"))
    b = relax.Var("b", relax.TensorType(sb, "bool" if op == "maskadd" else "float32"))
    if op in ("scores", "context"):
        body = relax.op.matmul(a, b)
    elif op == "maskadd":
        body = relax.op.add(a, relax.op.where(b, relax.const(0.0, "float32"),
                                              relax.const(-1e4, "float32")))
    else:
        body = relax.op.nn.softmax(relax.op.add(a, b), axis=-1)
    bb = relax.BlockBuilder()
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(body))
        bb.emit_func_output(out)
    return bb.get()


def build(mod, target, symbolic: bool):
    import tvm
    from slimc.backends.tvm.schedules import cpu_pipeline
    from tvm import relax

    if symbolic:
        mod["main"] = mod["main"].with_attr("tir_var_upper_bound", {"n": 512})
    with tvm.transform.PassContext(opt_level=3):
        ex = relax.build(mod, target=target, relax_pipeline=cpu_pipeline(target))
    return relax.VirtualMachine(ex, tvm.cpu())


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import tvm
    from tvm import tirx

    from slimc.targets import resolve_target

    target = resolve_target("llvm").tvm_target()
    length = args.length
    rng = np.random.default_rng(0)
    for op in args.ops.split(","):
        mod = module(op, length)
        vms = {"fixed": build(mod, target, False),
               "symbolic": build(module(op, tirx.Var("n", "int64")), target, True)}
        inputs = []
        for p in mod["main"].params:
            shape = [int(x) for x in p.ty.shape]
            if str(p.ty.dtype) == "bool":
                inputs.append(rng.random(shape) > 0.3)
            else:
                inputs.append(rng.standard_normal(shape).astype("float32"))
        tensors = [tvm.runtime.tensor(x) for x in inputs]
        times = {k: [] for k in vms}
        outs = {}
        for _ in range(args.calls):
            for name, vm in vms.items():
                start = time.perf_counter()
                outs[name] = vm["main"](*tensors)
                times[name].append(time.perf_counter() - start)
        diff = float(np.abs(outs["fixed"].numpy() - outs["symbolic"].numpy()).max())
        fixed, symbolic = min(times["fixed"]) * 1e6, min(times["symbolic"]) * 1e6
        print(f"{op:8s} L={length}: fixed {fixed:8.1f} us, symbolic {symbolic:8.1f} us, "
              f"symbolic / fixed {symbolic / fixed:.2f}, max difference {diff:.1e}", flush=True)
    load = os.getloadavg()
    print(f"threads {args.threads}, min of {args.calls} calls, load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
