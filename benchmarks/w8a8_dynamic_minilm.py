"""W8A8 all-MiniLM-L6-v2 compiled with the dynamic sequence default vs ``fixed``, at one length.

Three artifacts of ``quantize{weights=int8,activations=int8}``, compiled with no ``--input``:
``SLIMC_DEFAULT_SEQUENCE=dynamic`` (the default: symbolic rows, dot kernels on row blocks padded
to ``int8_kernels.ROWS``), ``=fixed`` (the example length, static dot kernels) and dynamic with
every W8A8 linear forced onto the generic int8 kernel (``int8_kernels.FORCE_KIND``; what the
dynamic default ran before the dot kernels took symbolic rows; the 1-row pooler too). They are
timed in this process, interleaved round by round, at ``--length`` tokens, with the float32
model compiled both ways (what the symbolic length costs outside the W8A8 linears); read the
ratios.

    python benchmarks/w8a8_dynamic_minilm.py --compile-only --workdir /tmp/w8dyn  # not timed
    /work/wt/bench.sh .venv/bin/python benchmarks/w8a8_dynamic_minilm.py --workdir /tmp/w8dyn

Prints a table and writes ``benchmarks/results/w8a8_dynamic_minilm.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = "quantize{weights=int8,activations=int8}"
ARTIFACTS = {"dynamic (dot)": ("dynamic", None), "fixed (dot)": ("fixed", None),
             "dynamic (generic)": ("dynamic", "generic"),
             # float32 (no pipeline): how much a symbolic length costs the rest of the model
             "fp32 dynamic": ("dynamic", "fp32"), "fp32 fixed": ("fixed", "fp32")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=12, help="interleaved rounds (multiple of 6)")
    p.add_argument("--calls", type=int, default=3, help="calls per engine per round")
    p.add_argument("--pause-ms", type=float, default=30.0)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--compile-only", action="store_true")
    return p.parse_args(argv)


def compile_all(model: str, work: Path, threads: int) -> None:
    from slimc.backends.tvm import int8_kernels

    import slimc

    for name, (sequence, kind) in ARTIFACTS.items():
        out = work / name.replace(" ", "_").replace("(", "").replace(")", "")
        if (out / "manifest.json").exists():
            continue
        os.environ["SLIMC_DEFAULT_SEQUENCE"] = sequence
        int8_kernels.FORCE_KIND = None if kind == "fp32" else kind
        start = time.perf_counter()
        slimc.compile_model(model, slimc.CompileOptions(
            pipeline=None if kind == "fp32" else PIPELINE, output=out, threads=threads,
            cache=False))
        int8_kernels.FORCE_KIND = None
        print(f"compiled {name} in {time.perf_counter() - start:.0f}s", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from dynamic_minilm import minilm_dir

    import slimc

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.compile_only:
        compile_all(minilm_dir(), args.workdir, args.threads)
        return 0
    arts = {name: slimc.load(args.workdir / name.replace(" ", "_").replace("(", "").replace(
        ")", "")) for name in ARTIFACTS}
    length = args.length
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(1000, 20000, (1, length)).astype(np.int64),
            "attention_mask": np.ones((1, length), np.int64),
            "token_type_ids": np.zeros((1, length), np.int64)}
    engines = {}
    for name, art in arts.items():
        arrays = art._arrange((), {k: v for k, v in feed.items()
                                   if k in {i["name"] for i in art.manifest["inputs"]}})
        engines[name] = lambda a=arrays, s=art: s.run_arrays(a)
    outs = {name: run() for name, run in engines.items()}
    first = next(iter(outs.values()))
    for name, out in outs.items():  # W8A8 dot vs generic: the same integers
        err = max(float(np.abs(a - b).max()) for a, b in zip(out, first, strict=True))
        print(f"{name}: max |diff| vs dynamic (dot) {err:.2e}")
    times = {name: [] for name in engines}
    orders = list(itertools.permutations(engines))
    for r in range(args.rounds):
        for name in orders[r % len(orders)]:
            time.sleep(args.pause_ms / 1e3)
            start = time.perf_counter()
            for _ in range(args.calls):
                engines[name]()
            times[name].append((time.perf_counter() - start) / args.calls)
    med = {name: float(np.median(v)) * 1e3 for name, v in times.items()}
    base = med["fixed (dot)"]
    for name, ms in med.items():
        print(f"length {length}: {name:18s} {ms:8.2f} ms  ({ms / base:.3f}x fixed (dot))")
    print(f"fp32 dynamic / fp32 fixed: {med['fp32 dynamic'] / med['fp32 fixed']:.3f}")
    load = os.getloadavg()
    print(f"threads {args.threads}, {args.rounds} rounds x {args.calls} calls, load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / "w8a8_dynamic_minilm.json").write_text(json.dumps(
        {"length": length, "threads": args.threads, "median_ms": med,
         "over_fixed": {k: v / base for k, v in med.items()}, "rounds": args.rounds,
         "calls": args.calls, "load_average": load}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
