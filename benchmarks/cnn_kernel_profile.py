"""Where a W8A8 conv net's time goes: slimc's kernels vs ONNX Runtime's operators, side by side.

Reads the artifacts ``benchmarks/run.py --workdir DIR`` left (``NAME-slimc-w8a8.slimc`` and
``NAME.qdq8.onnx``), then, interleaved in one process at the same thread count:

- slimc: every kernel call timed through the Relax VM's instrument hook, summed per kernel
  name over ``--calls`` calls, grouped by kind (dense int8 dot kernel, im2col, depthwise,
  elementwise / quantize, layout);
- ONNX Runtime: its own profiler (``SessionOptions.enable_profiling``), node times summed per
  operator type.

Prints per-call milliseconds per group and the top kernels of each engine. Exploratory (the
instrument adds a Python callback per kernel call); the whole-model ratios come from
``benchmarks/run.py``::

    python benchmarks/run.py --models mobilenet_v2 --engines slimc-w8a8,ort-qdq8 --workdir /tmp/w
    python benchmarks/cnn_kernel_profile.py --workdir /tmp/w --model mobilenet_v2
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True, help="benchmarks/run.py --workdir")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--top", type=int, default=15)
    return p.parse_args(argv)


def slimc_group(name: str) -> str:
    """A kernel's kind, from the names ``backends/tvm/int8_conv.py`` and Relax give them."""
    for pattern, group in ((r"linear_w8a8|int8_matmul|w8a8_vnni|w8a8_sdot", "dense int8 dot"),
                           (r"im2col", "im2col"), (r"depthwise", "depthwise"),
                           (r"grouped", "grouped"),
                           (r"transpose|permute", "layout"), (r"pad", "pad"),
                           (r"quantiz|round|clip|relu|add|multiply|divide|minimum|maximum",
                            "elementwise/quantize")):
        if re.search(pattern, name):
            return group
    return "other"


class SlimcEngine:
    def __init__(self, folder: Path, feed: dict[str, np.ndarray]) -> None:
        import tvm

        import slimc

        model = slimc.load(folder)
        names = [i["name"] for i in model.manifest["inputs"]]
        arrays = model._arrange((), {k: v for k, v in feed.items() if k in names})
        runner = model._runner
        self.vm = runner.vm
        self.args = [tvm.runtime.tensor(a, device=runner.device) for a in arrays]
        self.main = self.vm["main"]
        self.per_kernel: dict[str, float] = collections.defaultdict(float)
        self.counts: dict[str, int] = collections.defaultdict(int)
        self._start = 0.0

    def call(self) -> None:
        self.main(*self.args)

    def _hook(self, func, symbol, before, ret, *args):
        from tvm.runtime.vm import VMInstrumentReturnKind

        if before:
            self._start = time.perf_counter()
        elif not symbol.startswith("vm."):
            self.per_kernel[symbol] += time.perf_counter() - self._start
            self.counts[symbol] += 1
        return VMInstrumentReturnKind.NO_OP

    def instrumented(self) -> None:
        import tvm

        self.vm.set_instrument(tvm.runtime.convert(self._hook))
        self.call()
        self.vm.set_instrument(None)


def ort_profile(path: Path, feed: dict[str, np.ndarray], threads: int, calls: int,
                prefix: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    arrays = {n: feed[n] for n in names}
    for _ in range(5):
        session.run(None, arrays)
    walls = []
    for _ in range(calls):
        t0 = time.perf_counter()
        session.run(None, arrays)
        walls.append(time.perf_counter() - t0)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = collections.defaultdict(float)
    per_node: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            per_op[op] += e["dur"] / 1e6
            per_node[f"{op}:{e['name'][:-len('_kernel_time')]}"] += e["dur"] / 1e6
    runs = calls + 5
    return ({k: v / runs for k, v in per_op.items()}, {k: v / runs for k, v in per_node.items()},
            float(np.median(walls)))


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(HERE))
    import models

    _, inputs = getattr(models, args.model)()
    feed = {k: v.numpy() for k, v in inputs.items()}
    eng = SlimcEngine(args.workdir / f"{args.model}-slimc-w8a8.slimc", feed)
    for _ in range(5):
        eng.call()
    walls = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        eng.call()
        walls.append(time.perf_counter() - t0)
    for _ in range(args.calls):
        eng.instrumented()
    per_kernel = {k: v / args.calls for k, v in eng.per_kernel.items()}
    ort_op, ort_node, ort_wall = ort_profile(args.workdir / f"{args.model}.qdq8.onnx", feed,
                                             args.threads, args.calls,
                                             args.workdir / "ort_profile")
    groups: dict[str, float] = collections.defaultdict(float)
    for k, v in per_kernel.items():
        groups[slimc_group(k)] += v
    print(f"slimc W8A8: median {np.median(walls) * 1e3:.2f} ms uninstrumented, kernels sum "
          f"{sum(per_kernel.values()) * 1e3:.2f} ms")
    for g, v in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:24s} {v * 1e3:8.3f} ms")
    print(f"ORT QDQ int8: median {ort_wall * 1e3:.2f} ms unprofiled... (profiled run), ops sum "
          f"{sum(ort_op.values()) * 1e3:.2f} ms")
    for g, v in sorted(ort_op.items(), key=lambda kv: -kv[1]):
        print(f"  {g:24s} {v * 1e3:8.3f} ms")
    print(f"\nslimc top {args.top} kernels (ms per call, calls per inference):")
    for k, v in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {v * 1e3:8.3f}  x{eng.counts[k] // args.calls:<3d} {k}")
    print(f"\nORT top {args.top} nodes:")
    for k, v in sorted(ort_node.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {v * 1e3:8.3f}  {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
