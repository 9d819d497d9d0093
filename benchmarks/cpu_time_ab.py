"""Two slimc artifacts of one model (and ONNX Runtime) side by side in CPU time, one thread.

    python benchmarks/cpu_time_ab.py MODEL OLD_DIR NEW_DIR [--rounds 12] [--kernels 15]

``OLD_DIR`` / ``NEW_DIR`` are ``benchmarks/run.py --workdir`` folders holding
``MODEL-slimc.slimc`` (``OLD_DIR`` also ``MODEL.onnx``, for the ORT column). Why CPU time at one
thread: on a loaded host (other sessions building) 2-thread wall times are dominated by
preemption, while the calling thread's CPU time (``time.thread_time``) does not count the time
it was descheduled. Prints whole-call CPU time (min and median over interleaved rounds, each
engine three calls per round) and, for the two slimc artifacts, the kernels whose summed CPU
time per call (minimum over rounds, per call site) differs most. Run it through bench.sh.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

os.environ["TVM_NUM_THREADS"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _slimc(artifact: Path):
    import numpy as np
    import tvm
    from tvm import relax

    from slimc.artifact import read_manifest

    manifest = read_manifest(artifact)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact / manifest["library"])),
                              tvm.cpu())
    example = np.load(artifact / "example_inputs.npz")
    args = [tvm.runtime.tensor(example[spec["name"]]) for spec in manifest["inputs"]]
    return vm, args, example


def _per_kernel(vm, args, rounds: int) -> list[list]:
    """``[symbol, shape of the last argument, CPU seconds]`` per kernel call of one inference,
    each the minimum over ``rounds`` inferences."""
    calls: list = []
    started: dict = {}

    def instrument(func, symbol, before, ret, *call_args):
        if before:
            started["t"] = time.thread_time()
        else:
            shapes = [tuple(a.shape) for a in call_args if hasattr(a, "shape")]
            calls.append((symbol, str(shapes[-1:]), time.thread_time() - started["t"]))
        return 0

    vm.set_instrument(instrument)
    best: list | None = None
    for _ in range(rounds):
        calls.clear()
        vm["main"](*args)
        kept = [c for c in calls if not c[0].startswith("vm.builtin")]
        if best is None:
            best = [list(c) for c in kept]
        else:
            for b, c in zip(best, kept, strict=True):
                b[2] = min(b[2], c[2])
    vm.set_instrument(None)
    return best or []


def main(argv=None) -> int:
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--kernels", type=int, default=15, help="kernel rows to print")
    args = p.parse_args(argv)
    engines = {}
    runs = {}
    for label, folder in (("old", args.old), ("new", args.new)):
        vm, vm_args, example = _slimc(folder / f"{args.model}-slimc.slimc")
        engines[label] = (lambda vm=vm, a=vm_args: vm["main"](*a))
        runs[label] = (vm, vm_args)
    onnx = args.old / f"{args.model}.onnx"
    if onnx.exists():
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
        feed = {i.name: example[example.files[0]] for i in session.get_inputs()}
        engines["ort"] = lambda: session.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in engines}
    for call in engines.values():
        call()
        call()
    for _ in range(args.rounds):
        for label, call in engines.items():
            for _ in range(3):
                started = time.thread_time()
                call()
                times[label].append((time.thread_time() - started) * 1e3)
    old_min, old_med = np.min(times["old"]), np.median(times["old"])
    for label, t in times.items():
        print(f"{args.model:20s} {label:4s} CPU ms min {np.min(t):8.2f} median {np.median(t):8.2f}"
              f"  / old: min {np.min(t) / old_min:.3f} median {np.median(t) / old_med:.3f}"
              + (f"  / ort: median {np.median(t) / np.median(times['ort']):.3f}"
                 if "ort" in times else ""))
    kernels = {label: _per_kernel(*runs[label], args.rounds) for label in ("old", "new")}
    totals: dict = collections.defaultdict(lambda: [0.0, 0.0])
    for column, label in enumerate(("old", "new")):
        for symbol, shape, seconds in kernels[label]:
            totals[(symbol, shape)][column] += seconds * 1e3
    print(f"kernel sums, ms per call: old {sum(v[0] for v in totals.values()):.2f} "
          f"new {sum(v[1] for v in totals.values()):.2f}")
    for (symbol, shape), (old, new) in sorted(totals.items(),
                                              key=lambda kv: -abs(kv[1][0] - kv[1][1]))[
            :args.kernels]:
        print(f"  {old:8.3f} {new:8.3f} {new - old:+8.3f}  {symbol[:64]} {shape}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
