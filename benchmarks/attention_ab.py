"""SDPA attention alone, slimc's kernels next to ONNX Runtime's operators, one engine per process.

Each kernel's time inside the attention (``Q @ K^T``, the softmax, ``P @ V``, the head
copies), not alone: the softmax reads the scores the matmul just wrote, as in a model (ONNX
Runtime's Softmax ran 5.5-6.5 ms after its MatMul but 8-9 ms alone on a repeated buffer,
Whisper's 6 x 1500 x 1536 scores). One process per engine: ORT's spinning workers slow
whatever runs next in the same process.

    python benchmarks/attention_ab.py slimc 6x1500x64 --set INPLACE=0,EXP_ACCUMULATORS=1
    python benchmarks/attention_ab.py ort 6x1500x64

``--set`` overrides module constants of ``attention_softmax`` (A/B of its switches), or of
``fused_attention`` when prefixed (``--set fused_attention.ENABLED=0``: the separate
kernels). Prints the whole call's minimum and median over ``--reps`` calls and each kernel's
mean per call
(slimc: the VM's instrument hook, denormals flushed as the runtime does; ORT: its profiler).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.attention_softmax import sdpa_case  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("engine", choices=("slimc", "ort"))
    p.add_argument("shape", help="heads x length x head width, e.g. 6x1500x64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--set", default="", help="NAME=INT,... constants of attention_softmax "
                   "(fused_attention.NAME: of fused_attention)")
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import torch

    heads, length, width = (int(v) for v in args.shape.split("x"))

    module, inputs, want = sdpa_case(heads, length, width)
    work = Path(tempfile.mkdtemp(prefix="slimc-attn-ab-"))
    totals: dict[str, float] = collections.defaultdict(float)
    times: list[float] = []
    if args.engine == "ort":
        import onnxruntime as ort

        path = work / "attention.onnx"
        torch.onnx.export(module, inputs, str(path), input_names=["q", "k", "v"],
                          opset_version=17, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        options.enable_profiling, options.profile_file_prefix = True, str(work / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {n: x.numpy() for n, x in zip("qkv", inputs, strict=True)}
        got = session.run(None, feed)[0]
        for _ in range(args.reps):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        for event in json.loads(Path(session.end_profiling()).read_text()):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                totals[event["args"]["op_name"]] += event["dur"] / 1e3 / (args.reps + 1)
    else:
        import tvm
        from slimc.backends.tvm.build import build_library
        from slimc.backends.tvm.denormals import DenormalFlush
        from slimc.backends.tvm.schedules import attention_softmax, fused_attention
        from tvm.relax.frontend.torch import from_exported_program

        from slimc.targets import resolve_target

        modules = {"attention_softmax": attention_softmax, "fused_attention": fused_attention}
        for item in filter(None, args.set.split(",")):
            name, value = item.split("=")
            where, _, name = name.rpartition(".")
            setattr(modules[where or "attention_softmax"], name, int(value))
        mod = from_exported_program(torch.export.export(module, inputs),
                                    keep_params_as_input=False)
        lib = build_library(mod, resolve_target("llvm"), work / "attention.so")
        vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
        run = DenormalFlush(args.threads, True).call
        feed = [tvm.runtime.tensor(x.numpy()) for x in inputs]
        got = run(vm["main"], *feed)
        got = (got if hasattr(got, "numpy") else got[0]).numpy()
        for _ in range(args.reps):
            start = time.perf_counter()
            run(vm["main"], *feed)
            times.append(time.perf_counter() - start)
        started: dict[str, float] = {}

        def instrument(func, symbol, before, ret, *call_args):
            if before:
                started[symbol] = time.perf_counter()
            elif not symbol.startswith("vm."):
                totals[symbol] += (time.perf_counter() - started.pop(symbol)) * 1e3 / args.reps
            return 0

        vm.set_instrument(instrument)
        for _ in range(args.reps):
            run(vm["main"], *feed)
    err = float(np.abs(got - want).max())
    kernels = ", ".join(f"{k} {v:.2f}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1]))
    print(f"{args.engine} {args.shape} {args.set or '-'}: min {min(times) * 1e3:.2f} ms, median "
          f"{np.median(times) * 1e3:.2f} ms, max |error| {err:.1e}; {kernels}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
