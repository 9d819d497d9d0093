"""Two slimc artifacts of one model side by side: whole-call times interleaved, then each
kernel's time per call (Relax VM instrument), old and new in columns.

    python benchmarks/kernel_ab.py OLD.slimc NEW.slimc out.json [top]

Why: per-kernel A/B of a schedule change inside the model (a kernel can run differently in the
model than alone) with the same load for both; run it through bench.sh. 2 threads.
"""
import collections
import json
import os
import sys
import time

os.environ["TVM_NUM_THREADS"] = "2"
import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pathlib import Path  # noqa: E402

from slimc.artifact import read_manifest  # noqa: E402


def _load(path: str):
    art = Path(path)
    lib = tvm.runtime.load_module(str(art / read_manifest(art)["library"]))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    ex = np.load(art / "example_inputs.npz")
    args = [tvm.runtime.tensor(ex[k]) for k in ex.files]
    vm["main"](*args)
    return vm, args


def _per_kernel(vm, args, repeat: int = 5) -> tuple[dict, int]:
    totals: dict = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    started: dict = {}

    def instrument(func, symbol, before, ret, *call_args):
        if before:
            started[symbol] = time.perf_counter()
        else:
            totals[symbol] += time.perf_counter() - started.pop(symbol)
            calls[symbol] += 1
        return 0

    vm.set_instrument(instrument)
    for _ in range(repeat):
        vm["main"](*args)
    kernels = sum(n for s, n in calls.items() if not s.startswith("vm.builtin")) // repeat
    return {s: v / repeat * 1e3 for s, v in totals.items()}, kernels


def main() -> None:
    if len(sys.argv) < 4:
        print("usage: kernel_ab.py OLD.slimc NEW.slimc OUT.json [TOP]: two artifact folders of "
              "the same model (as benchmarks/run.py --workdir leaves them) and where to write "
              "the per-kernel table.", file=sys.stderr)
        raise SystemExit(2)
    vms = {tag: _load(path) for tag, path in zip(("A", "B"), sys.argv[1:3], strict=True)}
    whole: dict = {t: [] for t in vms}
    for _ in range(25):
        for t, (vm, args) in vms.items():
            start = time.perf_counter()
            vm["main"](*args)
            whole[t].append(time.perf_counter() - start)
    out = {}
    for t, (vm, args) in vms.items():
        ms, kernels = _per_kernel(vm, args)
        out[t] = {"whole_median_ms": float(np.median(whole[t]) * 1e3),
                  "whole_min_ms": float(min(whole[t]) * 1e3), "kernel_calls": kernels,
                  "kernel_sum_ms": sum(v for s, v in ms.items() if not s.startswith("vm.builtin")),
                  "per_kernel_ms": ms}
        print(t, {k: v for k, v in out[t].items() if k != "per_kernel_ms"})
    a, b = out["A"]["per_kernel_ms"], out["B"]["per_kernel_ms"]
    top = int(sys.argv[4]) if len(sys.argv) > 4 else 30
    for s in sorted(set(a) | set(b), key=lambda s: -max(a.get(s, 0), b.get(s, 0)))[:top]:
        print(f"{a.get(s, 0):7.3f} {b.get(s, 0):7.3f} {s}")
    Path(sys.argv[3]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
