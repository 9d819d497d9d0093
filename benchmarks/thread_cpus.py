"""run.py's protocol on one model (slimc and ONNX Runtime, 3-call blocks after a 400 ms pause),
printing per block the calls' ms and, per busy thread, the CPU it last ran on and its affinity.

    python benchmarks/thread_cpus.py --workdir DIR [--model levit_128s] [--rounds 24]
        [--engines slimc,slimc-nopin,ort] [--json FILE] [--start-on-worker]

Why: on a loaded 2-core host an engine sometimes runs 1.5-3x slower for many blocks in a row;
this shows where its threads were (``/proc/self/task/*/stat``). TVM pins its worker to one core
and leaves the calling thread free; slimc's runtime now keeps the caller off the workers' cores
during each call (``slimc.backends.tvm.affinity``): engine ``slimc`` is the runtime as shipped,
``slimc-nopin`` the same artifact with that pinning off. Artifacts as ``run.py --workdir DIR``
or ``idle_gap.py --compile-only`` left them (``DIR/<model>-slimc.slimc``). The summary counts,
per engine, the blocks with a call over 1.3x the engine's median of its fastest third of calls
("spiky": mostly the first call after the pause on a loaded host), the blocks whose calls 2 and
3 are *both* over 1.2x it ("steady": the slow mode of a thread sharing a core), and the blocks
whose caller last ran on a core a TVM worker is pinned to. ``--start-on-worker`` provokes the
slow mode: before each block the caller is moved onto the TVM worker's core (affinity set to
that core, then back to the full mask: the thread stays there until the scheduler moves it),
as Linux sometimes does by itself on a loaded host.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def thread_cpus() -> list[tuple[int, int, str, int]]:
    """(thread id, CPU last run on, affinity as digits, user+system ticks) per thread."""
    out = []
    for task in sorted(glob.glob("/proc/self/task/*")):
        fields = Path(task, "stat").read_text().rsplit(")", 1)[1].split()
        tid = int(task.rsplit("/", 1)[1])
        affinity = "".join(map(str, sorted(os.sched_getaffinity(tid))))
        out.append((tid, int(fields[36]), affinity, int(fields[11]) + int(fields[12])))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--model", default="levit_128s")
    p.add_argument("--rounds", type=int, default=24)
    p.add_argument("--engines", default="slimc,slimc-nopin,ort")
    p.add_argument("--json", type=Path, default=None, help="also write per-call ms here")
    p.add_argument("--start-on-worker", action="store_true",
                   help="move the caller onto the TVM worker's core before each block")
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = "2"
    import torch

    torch.set_num_threads(2)
    sys.path.insert(0, str(HERE))
    import models
    import run

    module, inputs = getattr(models, args.model)()
    arrays = {k: v.numpy() for k, v in inputs.items()}
    artifact = args.workdir / f"{args.model}-slimc.slimc"
    callers = {}
    engines = [e for e in args.engines.split(",") if e]
    for engine in engines:
        if engine in ("slimc", "slimc-nopin"):
            runner, names = run._artifact(artifact, 2, pin_caller=engine == "slimc")
            feed = [arrays[n] for n in names]
            callers[engine] = lambda runner=runner, feed=feed: runner(feed)
        elif engine == "ort":
            session = run._ort_session(module, inputs, 2, args.workdir / f"{args.model}.onnx")
            callers[engine] = lambda session=session: session.run(None, arrays)
        else:
            p.error(f"unknown engine {engine}")
    for fn in callers.values():
        for _ in range(3):
            fn()
    from slimc.backends.tvm.affinity import expected_worker_cores

    workers = expected_worker_cores(2)
    me = threading.get_native_id()
    order = list(callers)
    times: dict[str, list[list[float]]] = {e: [] for e in order}
    on_worker: dict[str, int] = {e: 0 for e in order}
    for r in range(args.rounds):
        for engine in order[r % len(order):] + order[:r % len(order)]:
            time.sleep(0.4)
            if args.start_on_worker and workers:
                every = os.sched_getaffinity(0)
                os.sched_setaffinity(0, {min(workers)})
                os.sched_setaffinity(0, every)
            ms = []
            for _ in range(3):
                t0 = time.perf_counter()
                callers[engine]()
                ms.append((time.perf_counter() - t0) * 1e3)
            times[engine].append(ms)
            threads = thread_cpus()
            on_worker[engine] += any(tid == me and cpu in workers for tid, cpu, *_ in threads)
            busy = [f"{tid % 1000}@{cpu}/{aff}:{ticks}"
                    for tid, cpu, aff, ticks in threads if ticks > 5]
            print(f"r{r:2} {engine:11} " + " ".join(f"{t:5.1f}" for t in ms) + "  "
                  + " ".join(busy), flush=True)
    print(f"\n{args.model}, {args.rounds} rounds, TVM workers pinned to {sorted(workers)}")
    print(f"{'engine':11} {'median':>7} {'calls2-3':>8} {'spiky':>6} {'steady':>6} "
          f"{'caller@worker':>13}")
    for engine, blocks in times.items():
        flat = sorted(t for b in blocks for t in b)
        fast = statistics.median(flat[: max(1, len(flat) // 3)])
        spiky = sum(max(b) > 1.3 * fast for b in blocks)
        steady = sum(min(b[1:]) > 1.2 * fast for b in blocks)
        print(f"{engine:11} {statistics.median(flat):7.2f} "
              f"{statistics.median([t for b in blocks for t in b[1:]]):8.2f} "
              f"{spiky:>6} {steady:>6} {on_worker[engine]:>7}/{len(blocks):<5}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "workers": sorted(workers),
                                         "times": times, "caller_on_worker": on_worker}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
