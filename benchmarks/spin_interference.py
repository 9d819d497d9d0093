"""Does one engine's spinning thread pool slow the next engine's call? An A/B in one process.

``benchmarks/run.py`` interleaves engines with a short pause (30 ms) between blocks, but TVM's
worker threads keep calling ``sched_yield`` for up to ``TVM_THREAD_POOL_SPIN_COUNT`` (300000)
iterations after each parallel loop -- ~150 ms of CPU after every slimc call on this host
(``run.py`` prints it as "idle after slimc"). On two cores an ONNX Runtime call made in that
window shares a core with a yielding TVM worker. This times, per round and in alternating
order, the same ORT session (spinning and non-spinning) called

* ``after-slimc``: ``--pause-ms`` after a slimc call (what ``run.py`` measures), and
* ``parked``: ``--parked-ms`` after a slimc call, when TVM's workers have gone to sleep,

and the reverse (slimc after an ORT call / parked), so the difference is the interference
alone; machine load drifting during the run hits both conditions alike::

    python benchmarks/spin_interference.py --models mobilenet_v2,resnet18 --workdir /tmp/w

``--workdir`` holds ``<model>-slimc.slimc`` and ``<model>.onnx`` as ``run.py --workdir`` leaves
them (nothing is compiled or written here).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mobilenet_v2")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--pause-ms", type=float, default=30.0)
    p.add_argument("--parked-ms", type=float, default=400.0)
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(HERE))
    import models
    from run import _artifact, _ort_session

    for name in args.models.split(","):
        module, inputs = getattr(models, name)()
        arrays = {k: v.numpy() for k, v in inputs.items()}
        runner, names = _artifact(args.workdir / f"{name}-slimc.slimc", args.threads)
        feed = [arrays[n] for n in names]
        onnx = args.workdir / f"{name}.onnx"
        engines = {"slimc": lambda runner=runner, feed=feed: runner(feed)}
        for label, spin in (("ort", True), ("ort-nospin", False)):
            session = _ort_session(module, inputs, args.threads, onnx, spinning=spin)
            engines[label] = lambda session=session, arrays=arrays: session.run(None, arrays)
        for fn in engines.values():
            for _ in range(3):
                fn()
        pairs = [("slimc", "ort"), ("slimc", "ort-nospin"), ("ort", "slimc"),
                 ("ort-nospin", "slimc")]
        times: dict[tuple[str, str, str], list[float]] = {}
        for r in range(args.rounds):
            for first, second in pairs:
                gaps = (("after", args.pause_ms), ("parked", args.parked_ms))
                for cond, gap in (gaps if r % 2 else gaps[::-1]):
                    engines[first]()
                    time.sleep(gap / 1e3)
                    t0 = time.perf_counter()
                    engines[second]()
                    times.setdefault((second, first, cond), []).append(
                        (time.perf_counter() - t0) * 1e3)
        print(f"== {name}, {args.threads} threads, {args.rounds} rounds, load "
              f"{os.getloadavg()[0]:.1f}: median (min) ms of the second engine, called "
              f"{args.pause_ms:.0f} ms / {args.parked_ms:.0f} ms after the first")
        for first, second in pairs:
            after = times[(second, first, "after")]
            parked = times[(second, first, "parked")]
            print(f"  {second:11} after {first:11}: {statistics.median(after):8.2f} "
                  f"({min(after):.2f})   parked: {statistics.median(parked):8.2f} "
                  f"({min(parked):.2f})   after/parked "
                  f"{statistics.median(after) / statistics.median(parked):.2f}x",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
