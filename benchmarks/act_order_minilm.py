"""GPTQ act-order in the search's candidate builds: cost and benefit on real all-MiniLM-L6-v2
(WordSim-353 Spearman, held out from the KJV calibration text), issue 17.

The ``--budget`` search builds its candidates with ``quantize{...,method=gptq}`` when
``--calib`` is given. For each uniform format, in one process and alternating the order: the
candidate as the search builds it, and with ``act_order=true``; the quantize pass's seconds
(from its pass record), the bytes, WordSim-353 and the output divergence from the original on
held-out KJV text (the search's proxy: 1 - cosine of the embeddings, worst batch).

    .venv/bin/python benchmarks/act_order_minilm.py [--formats int3-g64 int2-g64 ...]

Writes benchmarks/results/act_order_minilm.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.budget_minilm import INPUTS, MODEL, data  # noqa: E402
from benchmarks.prune_common import RESULTS, kjv  # noqa: E402

FORMATS = {
    "int4-g128-fz": {"weights": "int4", "group_size": 128, "symmetric": False,
                     "zero_point": "float"},
    "int3-g64": {"weights": "int3", "group_size": 64},
    "int3-g128": {"weights": "int3", "group_size": 128},
    "int2-g64": {"weights": "int2", "group_size": 64},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", nargs="*", default=list(FORMATS))
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--held-out", default="Exodus1:1-4:31")
    ap.add_argument("--tmp", default="/tmp/budget_bench")
    ap.add_argument("--rtn", action="store_true", help="also round to nearest (what the "
                    "damage table prices)")
    ap.add_argument("--out", default="act_order_minilm")
    args = ap.parse_args()

    from slimc.api import CompileOptions
    from slimc.calibration import load_calibration
    from slimc.capture import capture, load_model
    from slimc.compiler import _prepare_task
    from slimc.loaders.base import parse_overrides
    from slimc.passmanager import AnalysisManager, PassContext, PassManager
    from slimc.plugins import get_registry
    from slimc.search.driver import _fastest_torch_threads
    from slimc.search.search import Search, _Base, proxy_scorer, task_scorer
    from slimc.search.space import Techniques
    from slimc.targets import resolve_target

    pairs, calib_file = data(Path(args.tmp))
    held_file = Path(args.tmp) / "kjv_held_out.txt"
    held_file.write_text("\n".join(kjv(args.held_out)))
    registry = get_registry()
    ir, example = capture(load_model(MODEL, parse_overrides(INPUTS), registry))
    named = dict(zip(ir.input_names, example, strict=True))
    tokenizer = ir.annotations["source"]["tokenizer"]
    calibration = load_calibration(calib_file, named, model_dir=tokenizer,
                                   max_batches=args.calib_batches)
    held = load_calibration(held_file, named, model_dir=tokenizer, max_batches=4)
    ctx = PassContext(target=resolve_target("llvm", registry), example_inputs=example)
    ctx.calibration_batches = [[b[n] for n in ir.input_names] for b in calibration.batches]
    ctx.analyses = AnalysisManager(ir, ctx, PassManager(registry.passes).lookup)
    task = _prepare_task(CompileOptions(eval_data=pairs, calib=calib_file), ir, example,
                         registry, calibration, [], lambda s: None, searching=True)
    scorer = task_scorer(task)
    proxy = proxy_scorer(ir, ctx, batches=[[b[n] for n in ir.input_names]
                                           for b in held.batches], where="held-out KJV")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows = []
    t0 = time.perf_counter()
    with _fastest_torch_threads(ir, ctx.calibration(1)[0]):
        search = Search(ir, ctx, registry, Techniques.for_context("all", ctx), scorer, None,
                        log)
        base = _Base(0.0, ir, [], None)
        for k, name in enumerate(args.formats):
            row = {"format": name}
            variants = ([False, True] if k % 2 == 0 else [True, False]) + \
                (["rtn"] if args.rtn else [])
            for ao in variants:
                opts = dict(FORMATS[name], method="gptq", act_order=ao) if ao != "rtn" \
                    else dict(FORMATS[name])
                q, records, _, rel = search._build_items(
                    base, [("quantize", opts), ("eliminate-dead-code", {})])
                seconds = next(r.seconds for r in records if r.invocation.name == "quantize")
                value = scorer.score(q)
                key = "rtn" if ao == "rtn" else "act_order" if ao else "gptq"
                row[key] = {
                    "size": rel["size"], "spearman": value, "drop": scorer.drop(value),
                    "held_out_divergence": proxy.score(q), "quantize_seconds": seconds}
                del q
                log(f"{name} {key}: size {rel['size']:.4f}, spearman {value:.4f}, "
                    f"divergence {row[key]['held_out_divergence']:.4g}, quantize "
                    f"{seconds:.1f} s")
            row["seconds act_order/gptq"] = (row["act_order"]["quantize_seconds"]
                                             / row["gptq"]["quantize_seconds"])
            rows.append(row)
    out = {"original": scorer.original, "metric": scorer.label, "proxy": proxy.label,
           "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
