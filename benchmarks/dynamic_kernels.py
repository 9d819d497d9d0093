"""Where a dynamic-length artifact spends its time, next to a fixed-length one at one length.

Loads two slimc artifacts of the same model (e.g. the ``dynamic`` and ``static16`` folders that
``benchmarks/dynamic_minilm.py --workdir DIR`` leaves behind) and, interleaved in one process:

- times whole calls (``vm["main"]`` on device tensors, no numpy copies), median of many;
- times every kernel call through the Relax VM's instrument hook, summed per kernel name
  (median over calls), so the per-kernel table says which kernels differ;
- times the VM alone: the same calls with every kernel skipped by the hook
  (``VMInstrumentReturnKind.SKIP_RUN``), i.e. the shape, allocation and view instructions
  plus the hook's own cost (the same per kernel in both libraries);
- counts the VM's instructions by kind from the executable's text.

    python benchmarks/dynamic_kernels.py --workdir DIR --length 16 --threads 2
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--dynamic", default="dynamic", help="folder of the dynamic artifact")
    p.add_argument("--static", default=None, help="folder of the fixed one (static<LENGTH>)")
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=200, help="whole calls per engine")
    p.add_argument("--kernel-calls", type=int, default=30, help="instrumented calls per engine")
    p.add_argument("--top", type=int, default=25)
    return p.parse_args(argv)


def _instructions(library: Path) -> collections.Counter:
    import tvm
    from tvm import relax

    text = relax.VMExecutable(tvm.runtime.load_module(str(library))).as_text()
    kinds = collections.Counter()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "call":
            kinds[parts[1] if parts[1].startswith("vm.") else "kernel"] += 1
        elif parts and parts[0] in ("ret", "goto", "if"):
            kinds[parts[0]] += 1
    return kinds


def kernel_key(name: str) -> str:
    """A kernel's name without shape numbers and fused reshapes, so that the two libraries'
    versions of one kernel (``fused_reshape1_add`` and ``add``) share a key."""
    tokens = [re.sub(r"\d+$", "", t) for t in name.split("_")]
    kept = [t for t in tokens if t and t != "fused" and t != "reshape"]
    return "_".join(kept) or name


class Engine:
    """One artifact's VM, its device inputs, and timers."""

    def __init__(self, folder: Path, length: int) -> None:
        import tvm

        import slimc

        self.folder = folder
        self.model = slimc.load(folder)
        rng = np.random.default_rng(0)
        feed = {"input_ids": rng.integers(1000, 20000, (1, length)).astype(np.int64),
                "attention_mask": np.ones((1, length), np.int64),
                "token_type_ids": np.zeros((1, length), np.int64)}
        names = [i["name"] for i in self.model.manifest["inputs"]]
        arrays = self.model._arrange((), {k: v for k, v in feed.items() if k in names})
        runner = self.model._runner
        self.vm = runner.vm
        self.args = [tvm.runtime.tensor(a, device=runner.device) for a in arrays]
        self.main = self.vm["main"]
        self.per_kernel: dict[str, list[float]] = collections.defaultdict(list)
        self._acc: dict[str, float] = collections.defaultdict(float)
        self._start = 0.0
        self._skip = False

    def call(self) -> None:
        self.main(*self.args)

    def _hook(self, func, symbol, before, ret, *args):
        from tvm.runtime.vm import VMInstrumentReturnKind

        if before:
            if self._skip and not symbol.startswith("vm.") and "shape_func" not in symbol:
                return VMInstrumentReturnKind.SKIP_RUN
            self._start = time.perf_counter()
        else:
            self._acc[symbol] += time.perf_counter() - self._start
        return VMInstrumentReturnKind.NO_OP

    def instrumented(self, skip: bool) -> float:
        import tvm

        self._skip = skip
        self.vm.set_instrument(tvm.runtime.convert(self._hook))
        self._acc.clear()
        start = time.perf_counter()
        self.call()
        total = time.perf_counter() - start
        self.vm.set_instrument(None)
        if not skip:
            for name, seconds in self._acc.items():
                self.per_kernel[kernel_key(name)].append(seconds)
        return total


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    static_name = args.static or f"static{args.length}"
    engines = {"dynamic": Engine(args.workdir / args.dynamic, args.length),
               "static": Engine(args.workdir / static_name, args.length)}
    for name, eng in engines.items():
        kinds = _instructions(eng.folder / "model.so")
        print(f"{name}: {sum(kinds.values())} VM instructions: "
              + ", ".join(f"{k} {v}" for k, v in kinds.most_common()))
    for eng in engines.values():
        for _ in range(10):
            eng.call()
    whole = {n: [] for n in engines}
    for _ in range(args.calls):
        for name, eng in engines.items():
            start = time.perf_counter()
            eng.call()
            whole[name].append(time.perf_counter() - start)
    vm_only = {n: [] for n in engines}
    instrumented = {n: [] for n in engines}
    for _ in range(args.kernel_calls):
        for name, eng in engines.items():
            vm_only[name].append(eng.instrumented(skip=True))
            instrumented[name].append(eng.instrumented(skip=False))
    ms = {n: {"whole": np.median(whole[n]) * 1e3, "p10": np.percentile(whole[n], 10) * 1e3,
              "vm_only": np.median(vm_only[n]) * 1e3,
              "instrumented": np.median(instrumented[n]) * 1e3,
              "kernels": sum(np.median(v) for v in engines[n].per_kernel.values()) * 1e3}
          for n in engines}
    for n, row in ms.items():
        print(f"{n:8s} whole call median {row['whole']:.3f} ms (p10 {row['p10']:.3f}); "
              f"kernels (sum of medians) {row['kernels']:.3f} ms; VM with kernels skipped "
              f"{row['vm_only']:.3f} ms; instrumented call {row['instrumented']:.3f} ms")
    print(f"dynamic / static: whole {ms['dynamic']['whole'] / ms['static']['whole']:.3f}, "
          f"kernels {ms['dynamic']['kernels'] / ms['static']['kernels']:.3f}")
    dyn, sta = engines["dynamic"].per_kernel, engines["static"].per_kernel
    rows = []
    for name in set(dyn) | set(sta):
        d = float(np.median(dyn[name])) * 1e3 if name in dyn else 0.0
        s = float(np.median(sta[name])) * 1e3 if name in sta else 0.0
        rows.append((d - s, name, d, s))
    rows.sort(reverse=True)
    print(f"{'kernel (summed per call)':70s} {'dynamic ms':>10s} {'static ms':>10s}")
    for diff, name, d, s in rows[:args.top]:
        print(f"{name[:70]:70s} {d:10.3f} {s:10.3f}  {diff:+.3f}")
    load = os.getloadavg()
    print(f"length {args.length}, threads {args.threads}, load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
