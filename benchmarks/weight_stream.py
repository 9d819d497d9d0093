"""Weight-streaming rate of one short-M dense layer: slimc's kernel vs ONNX Runtime's MatMul.

    python benchmarks/weight_stream.py --shapes 50x768x3072,1x768x3072 --threads 1,2

For each ``MxKxN`` (rows x input features x output features, fp32) it times ``y = x @ W + b``
twice per engine: *warm*, the same weight on every call (it stays in L2 / L3), and *cold*,
cycling over ``--copies`` distinct weights of together more than the last-level cache, as a
whole transformer's weights are (CLIP ViT-B/32's 350 MB at 50 tokens: each weight is used by
50 rows, then not again in the call). Reported: microseconds per call and the weight bytes
read per second (``K x N x 4 / time``). slimc's side is the kernel of a one-``Linear`` artifact
called directly with copies of its (packed) weight argument; ORT's a graph of ``--copies``
``MatMul`` + ``Add`` nodes on one input, each with its own initializer (time / copies), its
pool not spinning between calls. Engines take turns, ``--rounds`` times, with a pause
between them (a spinning pool beside the next engine halved its 2-thread speed). Why:
with 50 rows a weight element feeds 50 multiply-adds, so a short-M matmul over weights that
come from memory is bound by how fast a core streams them, not by its FMA rate; the warm
numbers (what ``kernel_scaling.py`` measures) hide that. Run it through bench.sh.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def linear(m: int, k: int, n: int):
    """A one-``Linear`` model over ``[1, m, k]`` (a transformer's projection), seeded."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Linear(k, n).eval(), {"input": torch.randn(1, m, k)}


#: slimc variants: (``PANEL_PREFETCH``, ``TALL_NARROW_TILES``) of :mod:`.cpu_matmul`, for A/Bs.
VARIANTS = {"slimc": (True, True), "slimc-noprefetch": (False, True),
            "slimc-base": (False, False), "slimc-prefetch-only": (True, False)}


def _best(fn, number: int, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for i in range(number):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def slimc_kernel(m: int, k: int, n: int, workdir: Path):
    """The artifact's dense kernel and its call arguments, the weight argument's index."""
    import tvm
    from tvm import relax

    from slimc.artifact import read_manifest
    from slimc.compiler import CompileOptions, compile_model

    spec = workdir / "model.py"
    spec.write_text(f"import sys\nsys.path.insert(0, {str(HERE)!r})\n"
                    f"from weight_stream import linear\n\n\ndef model():\n"
                    f"    return linear({m}, {k}, {n})\n")
    out = workdir / f"lin{m}x{k}x{n}.slimc"
    compiled = compile_model(f"{spec}:model", CompileOptions(output=out, cache=False))
    manifest = read_manifest(compiled.output)
    lib = tvm.runtime.load_module(str(compiled.output / manifest["library"]))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    import numpy as np

    data = np.load(compiled.output / "example_inputs.npz")
    calls: list = []

    def instrument(func, symbol, before, ret, *call_args):
        if before and not symbol.startswith("vm.builtin"):
            calls.append((symbol, [tvm.runtime.tensor(a.numpy()) if hasattr(a, "numpy") else a
                                   for a in call_args]))
        return 0

    vm.set_instrument(instrument)
    vm["main"](*[tvm.runtime.tensor(data[key]) for key in data.files])

    def largest(call):
        return max((int(np.prod(a.shape)) for a in call[1] if hasattr(a, "shape")), default=0)

    symbol, args = max(calls, key=largest)
    weight = max(range(len(args)), key=lambda i: int(np.prod(args[i].shape))
                 if hasattr(args[i], "shape") else 0)
    return lib.imports[0].get_function(symbol), args, weight, symbol


def ort_session(m: int, k: int, n: int, copies: int, threads: int):
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    for c in range(copies):
        inits.append(numpy_helper.from_array(
            rng.standard_normal((k, n), dtype=np.float32) * 0.02, f"w{c}"))
        inits.append(numpy_helper.from_array(rng.standard_normal(n, dtype=np.float32), f"b{c}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{c}"], [f"p{c}"]))
        nodes.append(helper.make_node("Add", [f"p{c}", f"b{c}"], [f"y{c}"]))
        outs.append(helper.make_tensor_value_info(f"y{c}", TensorProto.FLOAT, [1, m, n]))
    graph = helper.make_graph(nodes, "lin", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, m, k])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # workers that spin after a call take the other core from the engine timed next
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    feed = {"x": rng.standard_normal((1, m, k), dtype=np.float32)}
    return lambda i: sess.run(None, feed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="50x768x3072", help="comma list of MxKxN")
    p.add_argument("--threads", default="1,2", help="comma list of thread counts")
    p.add_argument("--cold-bytes", type=float, default=320e6,
                   help="total bytes of the distinct weights cycled over for 'cold'")
    p.add_argument("--engines", default="slimc,ort",
                   help="ort and slimc variants: " + ", ".join(VARIANTS))
    p.add_argument("--number", type=int, default=20, help="calls per timing")
    p.add_argument("--rounds", type=int, default=7,
                   help="rounds; engines take turns in each, the best round is reported")
    p.add_argument("--pause", type=float, default=0.3,
                   help="seconds between engines (TVM's and ORT's pools park)")
    args = p.parse_args(argv)
    try:
        counts = [int(t) for t in args.threads.split(",")]
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
        if any(len(shape) != 3 or min(shape) < 1 for shape in shapes) or min(counts) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--shapes takes MxKxN triples of positive integers (got {args.shapes!r}) "
                f"and --threads positive integers (got {args.threads!r}), comma separated")
    unknown = [e for e in args.engines.split(",") if e != "ort" and e not in VARIANTS]
    if unknown:
        p.error(f"unknown engine(s) {', '.join(unknown)}: use ort and "
                f"{', '.join(VARIANTS)}")
    os.environ["TVM_NUM_THREADS"] = str(max(counts))
    engines = args.engines.split(",")
    import tvm

    configure = tvm.get_global_func("runtime.config_threadpool")

    print(f"{'shape':>16} {'engine':>16} {'thr':>3} {'warm us':>9} {'cold us':>9} "
          f"{'warm GB/s':>9} {'cold GB/s':>9}")
    with tempfile.TemporaryDirectory(prefix="wstream-") as tmp:
        for m, k, n in shapes:
            shape = f"{m}x{k}x{n}"
            wbytes = k * n * 4
            copies = max(2, int(args.cold_bytes // wbytes) + 1)
            callers: dict = {}  # engine -> (setup(threads), warm(i), cold(i), per-call divisor)
            for engine in [e for e in engines if e.startswith("slimc")]:
                from slimc.backends.tvm.schedules import cpu_matmul

                cpu_matmul.PANEL_PREFETCH, cpu_matmul.TALL_NARROW_TILES = VARIANTS[engine]
                sub = Path(tmp) / engine
                sub.mkdir(exist_ok=True)
                fn, cargs, w, symbol = slimc_kernel(m, k, n, sub)
                print(f"# {engine} kernel {symbol}, weight arg {w} shape {list(cargs[w].shape)}")
                weights = [tvm.runtime.tensor(cargs[w].numpy()) for _ in range(copies)]

                def call(i, fn=fn, cargs=cargs, w=w, weights=weights, cold=False):
                    a = list(cargs)
                    if cold:
                        a[w] = weights[i % len(weights)]
                    fn(*a)

                callers[engine] = (lambda t: configure(1, t), call,
                                   lambda i, call=call: call(i, cold=True), 1)
            sessions: dict = {}
            if "ort" in engines:
                def ort_setup(t, m=m, k=k, n=n, copies=copies, sessions=sessions):
                    sessions["warm"] = ort_session(m, k, n, 1, t)
                    sessions["cold"] = ort_session(m, k, n, copies, t)
                    sessions["warm"](0)
                    sessions["cold"](0)
                callers["ort"] = (ort_setup, lambda i, s=sessions: s["warm"](i),
                                  lambda i, s=sessions: s["cold"](i), copies)
            for t in counts:
                best = {e: [float("inf"), float("inf")] for e in callers}
                setups = {}
                for engine, (setup, _, _, _) in callers.items():
                    if engine == "ort":
                        setup(t)
                        setups[engine] = dict(sessions)
                for _ in range(args.rounds):  # engines interleaved, best round of each
                    for engine, (setup, warm, cold, divisor) in callers.items():
                        if engine == "ort":
                            sessions.update(setups[engine])
                        else:
                            setup(t)
                        time.sleep(args.pause)  # the previous engine's pool parks
                        best[engine][0] = min(best[engine][0], _best(warm, args.number, 1))
                        cold_calls = max(1, max(args.number, copies) // divisor)
                        best[engine][1] = min(best[engine][1],
                                              _best(cold, cold_calls, 1) / divisor)
                for engine, (warm, cold) in best.items():
                    print(f"{shape:>16} {engine:>16} {t:3d} {warm * 1e6:9.1f} {cold * 1e6:9.1f} "
                          f"{wbytes / warm / 1e9:9.2f} {wbytes / cold / 1e9:9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
