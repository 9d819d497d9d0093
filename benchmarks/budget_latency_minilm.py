"""Measured latency of a ``--budget latency=`` pick on real all-MiniLM-L6-v2 against fp32.

The budget search prices candidates with the cost model; this builds the artifacts (TVM, the
host target, the shapes the search costed: 32 x 8 tokens, and 1 x 128) and times them side by
side in one process (interleaved rounds, medians), so the ratio is what the cost model
predicted for. Two steps: build (untimed), then time through the machine-wide bench lock:

    .venv/bin/python benchmarks/budget_latency_minilm.py build \
        --pipeline 'quantize{weights=int8,activations=int8}'
    /work/wt/bench.sh .venv/bin/python benchmarks/budget_latency_minilm.py time

The calibration data is the one ``budget_minilm.py`` gives the search (KJV Genesis 1-3, one
batch), so the W8A8 activation scales are the search's candidate's. More pipelines can be
built into the same work folder under other names (``--name``) and timed together
(``time --names fp32,budget,pruned``: one interleaved loop); ``predict`` prints the host cost
model's ratio of each built pipeline to fp32 at each shape, to set beside the measured one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.budget_minilm import MODEL, data  # noqa: E402
from benchmarks.prune_common import RESULTS  # noqa: E402

SHAPES = {"32x8": ["input_ids=32x8:int64", "attention_mask=32x8:int64"],
          "1x128": ["input_ids=1x128:int64", "attention_mask=1x128:int64"]}


def build(args) -> None:
    import slimc

    _, calib = data(Path(args.tmp))
    built = Path(args.work) / "built.json"
    info = json.loads(built.read_text()) if built.exists() else {}
    for shape in args.shapes.split(","):
        inputs = SHAPES[shape]
        for name, pipeline in (("fp32", None), (args.name, args.pipeline)):
            done = Path(args.work) / f"fp32_{shape}"
            if name == "fp32" and f"fp32_{shape}" in info and done.exists():
                continue
            out = Path(args.work) / f"{name}_{shape}"
            t0 = time.perf_counter()
            result = slimc.compile_model(MODEL, slimc.CompileOptions(
                pipeline=pipeline, output=out, inputs=inputs, threads=args.threads,
                calib=calib if pipeline else None, calib_batches=1, force=True))
            info[f"{name}_{shape}"] = {
                "pipeline": pipeline or "-", "compile_s": round(time.perf_counter() - t0, 1),
                "verified": result.manifest["verification"]["passed"],
                "weight_bytes": result.manifest.get("weight_bytes_after")}
            print(info[f"{name}_{shape}"], flush=True)
            (Path(args.work) / "built.json").write_text(json.dumps(info, indent=1))


def timed(args) -> None:
    import os

    import slimc

    info = json.loads((Path(args.work) / "built.json").read_text())
    out = {"threads": args.threads, "rounds": args.rounds, "built": info,
           "load_before": os.getloadavg(), "shapes": {}}
    for shape in args.shapes.split(","):
        runners = {n: slimc.load(Path(args.work) / f"{n}_{shape}", threads=args.threads)
                   for n in args.names.split(",")}
        inputs = {n: r.example_inputs() for n, r in runners.items()}
        times: dict[str, list[float]] = {n: [] for n in runners}
        for _ in range(args.warmup):
            for n, r in runners.items():
                r(**inputs[n])
        names = list(runners)
        for i in range(args.rounds):
            order = names if i % 2 == 0 else names[::-1]
            for n in order:
                t0 = time.perf_counter()
                runners[n](**inputs[n])
                times[n].append(time.perf_counter() - t0)
        med = {n: 1e3 * statistics.median(t) for n, t in times.items()}
        out["shapes"][shape] = {"median_ms": med, "ratio": med[names[1]] / med["fp32"],
                                "ratios": {n: med[n] / med["fp32"] for n in med}}
        print(shape, out["shapes"][shape], flush=True)
    out["load_after"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=1))


def predict(args) -> None:
    """The host cost model's latency of each built pipeline relative to fp32, per shape (the
    same passes and calibration batch as the build, on the captured IR)."""
    from slimc.passes.analysis.cost import estimate_costs, target_dot_product
    from slimc.passes.analysis.hardware import hardware_for_target

    from slimc.calibration import load_calibration
    from slimc.capture import capture, load_model
    from slimc.loaders.base import parse_overrides
    from slimc.passmanager import AnalysisManager, PassContext, PassManager
    from slimc.pipeline import parse_pipeline_text, validate
    from slimc.plugins import get_registry
    from slimc.targets import resolve_target

    _, calib = data(Path(args.tmp))
    info = json.loads((Path(args.work) / "built.json").read_text())
    registry = get_registry()
    spec = resolve_target("llvm", registry)
    hw = hardware_for_target(spec)
    out = {}
    for shape in args.shapes.split(","):
        ir, example = capture(load_model(MODEL, parse_overrides(SHAPES[shape]), registry))
        cal = load_calibration(calib, dict(zip(ir.input_names, example, strict=True)),
                               model_dir=ir.annotations["source"]["tokenizer"], max_batches=1)

        batches = [[b[n] for n in ir.input_names] for b in cal.batches]

        def context(g, example=example, batches=batches):
            ctx = PassContext(target=spec, example_inputs=example)
            ctx.calibration_batches = batches
            ctx.analyses = AnalysisManager(g, ctx, PassManager(registry.passes).lookup)
            return ctx

        dot = target_dot_product(context(ir))
        fp32 = estimate_costs(ir, hw, dot_product=dot).total["latency_s"]
        out[shape] = {"fp32_ms": fp32 * 1e3}
        for key, entry in info.items():
            name = key.rsplit("_", 1)[0]
            if not key.endswith(shape) or name == "fp32":
                continue
            g = ir.clone()
            PassManager(registry.passes).run(g, validate(
                parse_pipeline_text(entry["pipeline"]) + [("eliminate-dead-code", {})],
                registry.passes), context(g))
            out[shape][name] = estimate_costs(g, hw, dot_product=dot).total["latency_s"] / fp32
            print(shape, name, entry["pipeline"], f"cost-model ratio {out[shape][name]:.3f}",
                  flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}_predicted.json").write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["build", "time", "predict"])
    ap.add_argument("--pipeline", default="quantize{weights=int8,activations=int8}")
    ap.add_argument("--name", default="budget", help="build: the artifact's name")
    ap.add_argument("--names", default="fp32,budget", help="time: the artifacts, fp32 first")
    ap.add_argument("--work", default="/tmp/budget_latency_minilm")
    ap.add_argument("--tmp", default="/tmp/budget_bench")
    ap.add_argument("--shapes", default="32x8,1x128", help="of " + ", ".join(SHAPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default="budget_latency_minilm")
    args = ap.parse_args()
    {"build": build, "time": timed, "predict": predict}[args.step](args)


if __name__ == "__main__":
    main()
