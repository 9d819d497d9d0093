"""Where a CNN artifact's whole-call time goes beyond its kernels: VM, order, or kernels.

``layer_profile.py`` times each kernel alone (hot, 20 calls back to back); their sum was ~45% of
the whole call for MobileNetV2 / V3 on the Intel host. This script separates, in one process:

* ``whole``: the Relax VM call (``vm["main"]``), median over ``--runs``;
* ``replay``: the same kernel calls, on the *same* buffers the VM passed them (recorded by
  reference under the VM instrument), run in graph order from Python: the VM's dispatch and
  allocation are gone, the cache and thread-pool behaviour of the sequence stays;
* ``per kernel in sequence``: each call of the replay timed alone with ``perf_counter``;
* ``hot``: each kernel repeated back to back (its best), as ``layer_profile.py`` does.

    /work/wt/bench.sh python benchmarks/call_gap.py ARTIFACT.slimc --threads 2 [--json out]

``--ftz``: the calling thread and TVM's pool workers flush denormals, as slimc's runtime does
(``backends/tvm/denormals.py``); without it a network whose activations decay into denormals
times microcode assists.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--ftz", action="store_true", help="flush denormals as the runtime does")
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import tvm
    from tvm import relax

    from slimc.artifact import read_manifest

    lib = tvm.runtime.load_module(str(args.artifact / read_manifest(args.artifact)["library"]))
    kernels = lib.imports[0]
    vm = relax.VirtualMachine(lib, tvm.cpu())
    data = np.load(args.artifact / "example_inputs.npz")
    inputs = [tvm.runtime.tensor(data[k]) for k in data.files]
    calls: list = []

    def instrument(func, symbol, before, ret, *call_args):
        if before and not symbol.startswith("vm.builtin"):
            calls.append((symbol, list(call_args)))
        return 0

    vm.set_instrument(instrument)
    vm["main"](*inputs)
    vm.set_instrument(None)
    tvm.get_global_func("runtime.config_threadpool")(1, args.threads)
    if args.ftz:
        from slimc.backends.tvm.denormals import _FloatEnvironment, flush_pool_workers

        env = _FloatEnvironment()
        flush_pool_workers(env)
        env.flush()
    fns = [(kernels.get_function(s), a) for s, a in calls]
    for _ in range(5):
        vm["main"](*inputs)
    whole, replay, per = [], [], [[] for _ in fns]
    clock = time.perf_counter
    for _ in range(args.runs):  # interleaved: whole call, plain replay, timed replay
        t0 = clock()
        vm["main"](*inputs)
        whole.append(clock() - t0)
        t0 = clock()
        for fn, a in fns:
            fn(*a)
        replay.append(clock() - t0)
        for i, (fn, a) in enumerate(fns):
            t0 = clock()
            fn(*a)
            per[i].append(clock() - t0)
    hot = []
    for fn, a in fns:
        best = float("inf")
        for _ in range(3):
            t0 = clock()
            for _ in range(10):
                fn(*a)
            best = min(best, (clock() - t0) / 10)
        hot.append(best)
    seq = [statistics.median(t) for t in per]
    rows = sorted(({"index": i, "kernel": s, "out": [int(d) for d in a[-1].shape]
                    if hasattr(a[-1], "shape") else [],
                    "in_sequence_us": q * 1e6, "hot_us": h * 1e6}
                   for i, ((s, a), q, h) in enumerate(zip(calls, seq, hot, strict=True))),
                  key=lambda r: r["hot_us"] - r["in_sequence_us"])
    out = {"artifact": str(args.artifact), "threads": args.threads, "kernels": len(calls),
           "whole_ms": statistics.median(whole) * 1e3,
           "replay_ms": statistics.median(replay) * 1e3,
           "sum_in_sequence_ms": sum(seq) * 1e3, "sum_hot_ms": sum(hot) * 1e3, "rows": rows}
    print(f"{args.artifact.name}: {len(calls)} kernel calls, {args.threads} threads, "
          f"load {os.getloadavg()[0]:.1f}")
    for key in ("whole_ms", "replay_ms", "sum_in_sequence_ms", "sum_hot_ms"):
        print(f"  {key:20s} {out[key]:8.3f}")
    print("  kernels losing most in sequence (in-sequence us, hot us):")
    for r in rows[:15]:
        print(f"    {r['index']:3d} {r['kernel'][:52]:52s} {str(r['out']):20s} "
              f"{r['in_sequence_us']:8.1f} {r['hot_us']:8.1f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
