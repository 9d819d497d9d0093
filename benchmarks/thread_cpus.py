"""run.py's protocol on one model (slimc and ONNX Runtime, 3-call blocks after a 400 ms pause),
printing per block the calls' ms and, per busy thread, the CPU it last ran on and its affinity.

    python benchmarks/thread_cpus.py --workdir DIR [--model levit_128s] [--rounds 24]
        [--pin-caller]

Why: on a loaded 2-core host an engine sometimes runs 1.5-3x slower for many blocks in a row;
this shows where its threads were (``/proc/self/task/*/stat``). TVM pins its worker to one core
and leaves the calling thread free; ``--pin-caller`` pins the caller to CPU 0 for each slimc
call (restored after), the candidate fix. Artifacts as ``idle_gap.py --compile-only`` left them.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
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
    p.add_argument("--pin-caller", action="store_true")
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = "2"
    import torch

    torch.set_num_threads(2)
    sys.path.insert(0, str(HERE))
    import models
    import run

    module, inputs = getattr(models, args.model)()
    arrays = {k: v.numpy() for k, v in inputs.items()}
    rargs = argparse.Namespace(reuse=True, tune_trials=0, target="llvm", threads=2)
    runner, names = run._slimc(args.model, rargs, args.workdir, run.Result(args.model))
    feed = [arrays[n] for n in names]
    session = run._ort_session(module, inputs, 2, args.workdir / f"{args.model}.onnx")
    every = os.sched_getaffinity(0)

    def slimc():
        if not args.pin_caller:
            return runner(feed)
        os.sched_setaffinity(0, {min(every)})
        try:
            return runner(feed)
        finally:
            os.sched_setaffinity(0, every)

    callers = {"slimc": slimc, "ort": lambda: session.run(None, arrays)}
    for fn in callers.values():
        for _ in range(3):
            fn()
    order = list(callers)
    for r in range(args.rounds):
        for engine in order[r % 2:] + order[:r % 2]:
            time.sleep(0.4)
            ms = []
            for _ in range(3):
                t0 = time.perf_counter()
                callers[engine]()
                ms.append((time.perf_counter() - t0) * 1e3)
            busy = [f"{tid % 1000}@{cpu}/{aff}:{ticks}"
                    for tid, cpu, aff, ticks in thread_cpus() if ticks > 5]
            print(f"r{r:2} {engine:5} " + " ".join(f"{t:5.1f}" for t in ms) + "  "
                  + " ".join(busy), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
