"""Per-kernel time of a slimc artifact next to ONNX Runtime's per-operator profile.

For finding *which* kernels make a workload slower than ONNX Runtime:

    python benchmarks/profile_kernels.py whisper_tiny_encoder --workdir /tmp/w --threads 2

``--workdir`` holds ``<model>-slimc.slimc`` and ``<model>.onnx`` as ``benchmarks/run.py
--workdir`` leaves them (built here when missing). slimc's side is the Relax VM profiler
(each ``call_tir`` kernel, summed over calls), ORT's its JSON profile summed per operator
type; both print the top kernels and the share of the total per category.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

CATEGORIES = (("matmul", ("matmul", "gemm", "dense", "conv")), ("norm", ("norm", "mean")),
              ("softmax", ("softmax",)), ("transpose", ("transpose", "permute", "reshape")))


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def slimc_profile(artifact: Path, feed: list, threads: int, repeat: int,
                  flush: bool = True) -> dict[str, float]:
    """Microseconds per call of each kernel: the VM's instrument hook times every call
    instruction (a few microseconds of Python overhead each, on both sides of the ratio).
    ``flush``: denormals flushed to zero in the calling thread and TVM's workers, as the
    artifact's runtime does by default on x86-64 (``backends/tvm/denormals.py``); without it a
    softmax whose probabilities underflow ran 1.6x ORT's in Whisper-tiny's profile."""
    import time

    import tvm
    from tvm import relax

    from slimc.artifact import read_manifest

    manifest = read_manifest(artifact)
    lib = tvm.runtime.load_module(str(artifact / manifest["library"]))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    args = [tvm.runtime.tensor(x) for x in feed]
    from slimc.backends.tvm.denormals import DenormalFlush

    run = DenormalFlush(threads, flush).call
    run(vm["main"], *args)
    totals: dict[str, float] = collections.defaultdict(float)
    started: dict[str, float] = {}

    def instrument(func, symbol, before, ret, *call_args):
        if before:
            started[symbol] = time.perf_counter()
        else:
            totals[symbol] += (time.perf_counter() - started.pop(symbol)) * 1e6 / repeat
        return 0

    vm.set_instrument(instrument)
    for _ in range(repeat):
        run(vm["main"], *args)
    return {k: v for k, v in totals.items() if not k.startswith("vm.builtin")}


def ort_profile(onnx_path: Path, feed: dict, threads: int, repeat: int) -> dict[str, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(onnx_path.with_suffix(""))
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    session.run(None, feed)
    for _ in range(repeat):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / (repeat + 1)
    return totals


def show(title: str, totals: dict[str, float], top: int) -> None:
    total = sum(totals.values())
    print(f"\n{title}: {total / 1e3:.2f} ms per call")
    by_cat: dict[str, float] = collections.defaultdict(float)
    for name, us in totals.items():
        by_cat[category(name)] += us
    print("  " + ", ".join(f"{c} {us / 1e3:.2f} ms ({us / total:.0%})"
                           for c, us in sorted(by_cat.items(), key=lambda kv: -kv[1])))
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {us / 1e3:8.3f} ms  {us / total:5.1%}  {name}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a factory of benchmarks/models.py")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", type=Path, default=None,
                   help="also write both per-kernel tables (microseconds per call) here, e.g. "
                   "to compare one profile at 1 thread with one at 2 kernel by kernel")
    p.add_argument("--no-flush", action="store_true",
                   help="slimc's kernels without denormals flushed (the runtime flushes them "
                   "by default; ONNX Runtime does not unless asked)")
    args = p.parse_args(argv)
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import models
    from run import _ort_session

    from slimc.compiler import CompileOptions, compile_model

    module, inputs = getattr(models, args.model)()
    arrays = {k: v.numpy() for k, v in inputs.items()}
    artifact = args.workdir / f"{args.model}-slimc.slimc"
    if not (artifact / "manifest.json").exists():
        compile_model(f"{HERE / 'models.py'}:{args.model}",
                      CompileOptions(target="llvm", output=artifact, threads=args.threads))
    onnx_path = args.workdir / f"{args.model}.onnx"
    _ort_session(module, inputs, args.threads, onnx_path)  # exports when missing
    from slimc.artifact import read_manifest

    names = [spec["name"] for spec in read_manifest(artifact)["inputs"]]
    slimc = slimc_profile(artifact, [arrays[n] for n in names], args.threads, args.repeat,
                          not args.no_flush)
    show("slimc", slimc, args.top)
    onnx = ort_profile(onnx_path, arrays, args.threads, args.repeat)
    show("ONNX Runtime", onnx, args.top)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "threads": args.threads,
                                         "slimc_us": slimc, "ort_us": onnx}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
