"""A CNN's conv layers side by side: each slimc kernel timed alone next to ONNX Runtime's node.

For finding *which layers* of a conv net make it slower than ONNX Runtime (``profile_kernels.py``
sums per operator type, which hides a few losing convs among many winning ones)::

    python benchmarks/run.py --models mobilenet_v3_large --engines slimc,ort --workdir /tmp/w
    /work/wt/bench.sh python benchmarks/layer_profile.py /tmp/w mobilenet_v3_large --json out.json

slimc: one inference under the Relax VM instrument records every kernel call with its
arguments; each call is then repeated ``--number`` times back to back (best of 5) at
``--threads``. ONNX Runtime: its own profiler (node ``*_kernel_time`` events), median over
``--runs`` inferences. Conv layers are paired in graph order by their output map (channels,
height, width; slimc's NHWC, ORT's NCHW, whose NCHWc convs carry channels padded to 16);
every other kernel / node is listed unpaired with its time, so the sums are comparable.
ORT's profiler adds a little per node, slimc's side has no call overhead at all: ratios
below ~1.1 on small layers are not a loss by themselves.

``--ftz``: both sides flush denormals (slimc's kernels on threads switched as its runtime does,
ORT with ``session.set_denormal_as_zero=1`` and no default session created before it: ORT's
denormal mode is process state). Without it neither flushes; on a network whose activations
decay into denormals (EfficientNet-B0, random weights) that times microcode assists, not kernels.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def slimc_layers(artifact: Path, threads: int, number: int, ftz: bool = False) -> list[dict]:
    """Every kernel call of one inference, timed alone: name, output shape, microseconds."""
    import numpy as np
    import tvm
    from tvm import relax

    from slimc.artifact import read_manifest

    lib = tvm.runtime.load_module(str(artifact / read_manifest(artifact)["library"]))
    kernels = lib.imports[0]
    vm = relax.VirtualMachine(lib, tvm.cpu())
    data = np.load(artifact / "example_inputs.npz")
    calls: list = []

    def instrument(func, symbol, before, ret, *call_args):
        if before and not symbol.startswith("vm.builtin"):
            calls.append((symbol, [tvm.runtime.tensor(a.numpy()) if hasattr(a, "numpy") else a
                                   for a in call_args]))
        return 0

    vm.set_instrument(instrument)
    vm["main"](*[tvm.runtime.tensor(data[k]) for k in data.files])
    tvm.get_global_func("runtime.config_threadpool")(1, threads)
    if ftz:  # this thread and its TVM pool workers, for the rest of the process
        from slimc.backends.tvm.denormals import _FloatEnvironment, flush_pool_workers

        env = _FloatEnvironment()
        flush_pool_workers(env)
        env.flush()
    rows = []
    for symbol, args in calls:
        fn = kernels.get_function(symbol)
        fn(*args)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(number):
                fn(*args)
            best = min(best, (time.perf_counter() - t0) / number)
        shapes = [[int(d) for d in a.shape] for a in args if hasattr(a, "shape")]
        out = shapes[-1] if shapes else []
        rows.append({"kernel": symbol, "out": out, "us": best * 1e6})
    return rows


def ort_layers(onnx_path: Path, feed: dict, threads: int, runs: int,
               ftz: bool = False) -> list[dict]:
    """ORT's nodes in execution order: name, op, output shape, median microseconds."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(onnx_path.with_suffix(""))
    if ftz:
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, feed)
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    times: dict = collections.defaultdict(list)
    info: dict = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            name = event["name"][:-len("_kernel_time")]
            times[name].append(event["dur"])
            shapes = event["args"].get("output_type_shape") or [{}]
            out = next(iter(shapes[0].values()), []) if shapes else []
            info.setdefault(name, (event["args"]["op_name"], out))
    return [{"node": n, "op": info[n][0], "out": info[n][1],
             "us": statistics.median(ts[-runs:])} for n, ts in times.items()]


def pair(slimc: list[dict], onnx: list[dict]) -> list[tuple]:
    """Conv layers matched in order by output map: ``(slimc row, ORT row)``."""
    convs = [r for r in onnx if "Conv" in r["op"]]
    pairs, j = [], 0
    for row in slimc:
        if "conv" not in row["kernel"] and "matmul" not in row["kernel"]:
            continue
        if len(row["out"]) != 4:
            continue
        n, h, w, c = row["out"]
        for k in range(j, min(j + 6, len(convs))):
            oc = convs[k]["out"][1:2]
            if convs[k]["out"][2:] == [h, w] and oc and oc[0] in (c, -(-c // 16) * 16):
                pairs.append((row, convs[k]))
                j = k + 1
                break
    return pairs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path, help="benchmarks/run.py --workdir with both artifacts")
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--number", type=int, default=20)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--ftz", action="store_true",
                   help="both engines flush denormals (like run.py's slimc vs ort-ftz)")
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    artifact = args.workdir / f"{args.model}-slimc.slimc"
    onnx_path = args.workdir / f"{args.model}.onnx"
    if not artifact.is_dir() or not onnx_path.is_file():
        print(f"error: {args.workdir} has no {artifact.name} / {onnx_path.name}; run "
              "benchmarks/run.py --engines slimc,ort --workdir on it first.", file=sys.stderr)
        return 2
    import numpy as np

    data = np.load(artifact / "example_inputs.npz")
    import onnx as onnx_lib

    # input names from the file, not from a default ORT session (it would fix ORT's denormal mode)
    graph = onnx_lib.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    names = [i.name for i in graph.input if i.name not in inits]
    feed = dict(zip(names, [data[k] for k in data.files], strict=True))
    slimc = slimc_layers(artifact, args.threads, args.number, args.ftz)
    onnx = ort_layers(onnx_path, feed, args.threads, args.runs, args.ftz)
    pairs = pair(slimc, onnx)
    print(f"{'slimc kernel':58s} {'out (NHWC)':18s} {'slimc us':>9s} {'ORT us':>8s} ratio")
    for s, o in sorted(pairs, key=lambda pr: pr[1]["us"] - pr[0]["us"]):
        print(f"{s['kernel'][:58]:58s} {str(s['out']):18s} {s['us']:9.1f} {o['us']:8.1f} "
              f"{s['us'] / o['us']:.2f}")
    paired_s = sum(s["us"] for s, _ in pairs)
    paired_o = sum(o["us"] for _, o in pairs)
    print(f"paired convs: {len(pairs)}, slimc {paired_s:.0f} us, ORT {paired_o:.0f} us")
    print(f"all kernels: slimc {sum(r['us'] for r in slimc):.0f} us ({len(slimc)}), "
          f"ORT {sum(r['us'] for r in onnx):.0f} us ({len(onnx)})")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "threads": args.threads,
                                         "slimc": slimc, "ort": onnx,
                                         "pairs": [[s, o] for s, o in pairs]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
