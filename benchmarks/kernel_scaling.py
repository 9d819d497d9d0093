"""Each kernel of a slimc artifact timed alone at 1 and at 2 threads, in one process.

For telling a workload's 1 -> 2 thread scaling apart from its kernels' own scaling::

    python benchmarks/kernel_scaling.py /tmp/w/mobilenet_v2-slimc.slimc --json out.json

One inference runs under the Relax VM's instrument hook, which records every kernel call with
(a copy of) its arguments; then each call is repeated ``--number`` times back to back (best of
5) with TVM's pool at 1 thread and again at 2 (``runtime.config_threadpool``). The sum over
the calls at 2 threads against the whole inference's time at 2 threads (``benchmarks/run.py``)
says how much the sequence costs beyond its kernels: wake-ups, barriers, a descheduled worker.
Inputs are the artifact's ``example_inputs.npz``. Needs ``TVM_NUM_THREADS`` >= 2 (set here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path, help="a .slimc folder with example_inputs.npz")
    p.add_argument("--number", type=int, default=30, help="calls per timing (best of 5)")
    p.add_argument("--threads", default="1,2", help="thread counts to time, comma list")
    p.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    counts = [int(t) for t in args.threads.split(",")]
    os.environ["TVM_NUM_THREADS"] = str(max(counts))
    import numpy as np
    import tvm
    from tvm import relax

    from slimc.artifact import read_manifest

    manifest = read_manifest(args.artifact)
    lib = tvm.runtime.load_module(str(args.artifact / manifest["library"]))
    kernels = lib.imports[0]
    vm = relax.VirtualMachine(lib, tvm.cpu())
    data = np.load(args.artifact / "example_inputs.npz")
    calls: list = []

    def instrument(func, symbol, before, ret, *call_args):
        if before and not symbol.startswith("vm.builtin"):
            calls.append((symbol, [tvm.runtime.tensor(a.numpy()) if hasattr(a, "numpy") else a
                                   for a in call_args]))
        return 0

    vm.set_instrument(instrument)
    vm["main"](*[tvm.runtime.tensor(data[k]) for k in data.files])
    configure = tvm.get_global_func("runtime.config_threadpool")
    rows = [{"call": i, "kernel": s, "shapes": [list(a.shape) for a in c if hasattr(a, "shape")]}
            for i, (s, c) in enumerate(calls)]
    for threads in counts:
        configure(1, threads)
        for row, (symbol, call_args) in zip(rows, calls, strict=True):
            fn = kernels.get_function(symbol)
            fn(*call_args)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(args.number):
                    fn(*call_args)
                best = min(best, (time.perf_counter() - t0) / args.number)
            row[f"us_t{threads}"] = best * 1e6
    totals = {t: sum(r[f"us_t{t}"] for r in rows) / 1e3 for t in counts}
    print(f"{len(rows)} kernel calls; sum ms: " + ", ".join(
        f"{t} thread(s) {ms:.3f}" for t, ms in totals.items()))
    for r in rows:
        if "library_weight" in r["kernel"]:
            continue
        times = " ".join(f"{r[f'us_t{t}']:8.1f}" for t in counts)
        ratio = r[f"us_t{counts[0]}"] / r[f"us_t{counts[-1]}"]
        print(f"{r['call']:3d} {times}  x{ratio:4.2f}  {r['kernel'][:56]:56s} {r['shapes']}")
    if args.json:
        args.json.write_text(json.dumps({"artifact": str(args.artifact), "sum_ms": totals,
                                         "calls": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
