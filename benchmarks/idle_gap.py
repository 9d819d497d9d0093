"""Latency of the first call after an idle gap: slimc's artifact vs ONNX Runtime, same gaps.

    python benchmarks/idle_gap.py --models levit_128s,resnet18 --workdir DIR [--compile-only]
        [--gaps 0,10,100,400,1000] [--rounds 8] [--spin-count N] [--json out.json]

Why: ``run.py`` pauses 400 ms before each engine's block and runs the engines round-robin, so
its slow slimc calls could be a deployment cost (a user calling once after idle pays it:
thread-pool wake-up, cold caches, page faults, CPU frequency) or an artifact of that protocol.
Here each engine is called once, left idle ``gap`` ms, then timed for one call, with no other
engine running in between; gaps and engines rotate per round. Also reports the CPU time the
process burned during the gap (a spinning thread pool shows here). Compile first with
``--compile-only`` (outside ``bench.sh``), then time with ``--workdir`` (artifacts reused).
Set ``TVM_THREAD_POOL_SPIN_COUNT`` with ``--spin-count`` (read once, when the pool starts).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="levit_128s")
    p.add_argument("--engines", default="slimc,ort")
    p.add_argument("--gaps", default="0,10,100,400,1000")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--spin-count", type=int, default=None)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--evict-mb", type=int, default=0,
                   help="after the gap, write this many MB (evicts the caches) before the "
                        "timed call: does a cold cache alone reproduce the after-idle cost?")
    args = p.parse_args(argv)
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    if args.spin_count is not None:
        os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = str(args.spin_count)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    import models
    import run

    args.workdir.mkdir(parents=True, exist_ok=True)
    gaps = [float(g) for g in args.gaps.split(",")]
    report = {}
    for name in args.models.split(","):
        module, inputs = getattr(models, name)()
        arrays = {k: v.numpy() for k, v in inputs.items()}
        callers = {}
        engines = args.engines.split(",")
        if "slimc" in engines:
            rargs = argparse.Namespace(reuse=True, tune_trials=0, target="llvm",
                                       threads=args.threads)
            runner, names = run._slimc(name, rargs, args.workdir, run.Result(name))
            feed = [arrays[n] for n in names]
            callers["slimc"] = lambda runner=runner, feed=feed: runner(feed)
        if "ort" in engines:
            session = run._ort_session(module, inputs, args.threads,
                                       args.workdir / f"{name}.onnx")
            callers["ort"] = lambda session=session, arrays=arrays: session.run(None, arrays)
        if args.compile_only:
            continue
        for fn in callers.values():
            for _ in range(5):
                fn()
        times = {e: {g: [] for g in gaps} for e in callers}
        idle_cpu = {e: {g: [] for g in gaps} for e in callers}
        second = {e: {g: [] for g in gaps} for e in callers}  # the call right after it
        order = list(callers)
        evict = np.zeros(args.evict_mb << 18, np.float32) if args.evict_mb else None
        for r in range(args.rounds):
            rot_gaps = gaps[r % len(gaps):] + gaps[:r % len(gaps)]
            for gap in rot_gaps:
                for engine in order[r % len(order):] + order[:r % len(order)]:
                    fn = callers[engine]
                    time.sleep(0.3)  # the other engine's pool parks (ORT spins, TVM spins)
                    fn()
                    fn()  # warm, steady state
                    c0 = time.process_time()
                    if gap:
                        time.sleep(gap / 1e3)
                    c1 = time.process_time()
                    if evict is not None:
                        evict += 1.0
                    t0 = time.perf_counter()
                    fn()
                    t1 = time.perf_counter()
                    fn()
                    times[engine][gap].append((t1 - t0) * 1e3)
                    second[engine][gap].append((time.perf_counter() - t1) * 1e3)
                    idle_cpu[engine][gap].append((c1 - c0) * 1e3)
        report[name] = {e: {str(g): {"median_ms": float(np.median(times[e][g])),
                                     "min_ms": float(np.min(times[e][g])),
                                     "idle_cpu_ms": float(np.median(idle_cpu[e][g])),
                                     "second_ms": float(np.median(second[e][g])),
                                     "all": times[e][g]} for g in gaps} for e in order}
        print(f"== {name} ({args.threads} threads, spin count "
              f"{os.environ.get('TVM_THREAD_POOL_SPIN_COUNT', 'default')}, "
              f"evict {args.evict_mb} MB, "
              f"{args.rounds} rounds): median ms [min] (CPU ms burnt in the gap) "
              "<median ms of the call right after>")
        print("gap ms  " + "".join(f"{e:>38}" for e in order))
        for g in gaps:
            cells = "".join(f"{report[name][e][str(g)]['median_ms']:>14.2f} "
                            f"[{report[name][e][str(g)]['min_ms']:6.2f}] "
                            f"({report[name][e][str(g)]['idle_cpu_ms']:5.1f}) "
                            f"<{report[name][e][str(g)]['second_ms']:5.2f}>" for e in order)
            print(f"{g:6.0f}  {cells}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
