"""The search's recovery by distillation with and without the quantized grids on real
all-MiniLM-L6-v2 (WordSim-353 Spearman, held out from the KJV calibration text), issue 17.

For each precision-only candidate (the pipelines the ``--budget`` search writes with
``--calib``: ``quantize{...,method=gptq}``, then ``eliminate-dead-code``), in one process:
the candidate undistilled, then ``distill`` inserted where the search puts it
(:func:`slimc.search.recovery.with_distill`) at the same step count and learning rate, once
training only the float weights left (what the search did before: norms, biases of fp32
layers) and once also the quantized grids (``scales=true``), in alternating order. Same
bytes by construction (checked: the sizes are printed). Both variants judge the result on
WordSim-353, which the distillation never sees; the pass also records its own held-out loss
on the calibration batches it keeps out of training.

    .venv/bin/python benchmarks/recovery_scales_minilm.py [--steps 120] \
        [--candidates int3-g64 int2-g64 ...]

Writes benchmarks/results/recovery_scales_minilm.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.budget_minilm import wordsim_search_context  # noqa: E402
from benchmarks.prune_common import RESULTS  # noqa: E402

#: Candidate name -> the search's quantize options (uniform format, GPTQ as with --calib).
CANDIDATES = {
    "int3-g64": {"weights": "int3", "group_size": 64},
    "int3-g128": {"weights": "int3", "group_size": 128},
    "int2-g64": {"weights": "int2", "group_size": 64},
    "int4-g128": {"weights": "int4", "group_size": 128, "symmetric": False},
    # a mix as the knapsack writes: int4 attention, int3 FFN
    "mix-int4attn-int3ffn": {"weights": "int3", "group_size": 64,
                             "layers": "*.attention.*=int4-g128-fz"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--lr", type=float, default=None, help="default: the search's DISTILL_LR")
    ap.add_argument("--candidates", nargs="*", default=["int3-g64", "int2-g64"])
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--tmp", default="/tmp/budget_bench")
    ap.add_argument("--out", default="recovery_scales_minilm")
    args = ap.parse_args()

    from slimc.search.driver import _fastest_torch_threads
    from slimc.search.recovery import with_distill
    from slimc.search.search import DISTILL_LR, Search, _Base
    from slimc.search.space import Techniques

    lr = DISTILL_LR if args.lr is None else args.lr
    registry, ir, example, ctx, scorer = wordsim_search_context(Path(args.tmp), args.calib_batches)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows = []
    t0 = time.perf_counter()
    with _fastest_torch_threads(ir, ctx.calibration(1)[0]):
        search = Search(ir, ctx, registry, Techniques.for_context("all", ctx), scorer, None,
                        log)
        # the unpruned base without its damage table: these candidates are given, not solved
        base = _Base(0.0, ir, [], None)
        search._bases[0.0] = base
        for k, name in enumerate(args.candidates):
            opts = dict(CANDIDATES[name])
            if args.method != "rtn":
                opts["method"] = args.method
            rest = [("quantize", opts), ("eliminate-dead-code", {})]
            q, _, _, rel = search._build_items(base, rest)
            value = scorer.score(q)
            del q
            row = {"candidate": name, "pipeline": rest, "size": rel["size"],
                   "before": {"spearman": value, "drop": scorer.drop(value)}}
            log(f"{name}: size {rel['size']:.4f}, spearman {value:.4f} "
                f"(drop {scorer.drop(value):.4f})")
            variants = [False, True] if k % 2 == 0 else [True, False]
            for scales in variants:
                items, _ = with_distill(rest, {"steps": args.steps, "lr": lr}, scales=scales)
                t1 = time.perf_counter()
                d, _, _, rel_d = search._build_items(base, items)
                summary = d.annotations["distill"]
                value_d = scorer.score(d)
                del d
                key = "grids+floats" if scales else "floats only (before)"
                row[key] = {
                    "distill": items[1][1], "size": rel_d["size"], "spearman": value_d,
                    "drop": scorer.drop(value_d),
                    "held_out_loss_before": summary["held_out_loss_before"],
                    "held_out_loss_after": summary["held_out_loss_after"],
                    "kept": summary["kept"], "trained_params": summary["trained_params"],
                    "trained_tensors": summary["trained_tensors"],
                    "step_seconds": summary["step_seconds"],
                    "seconds": round(time.perf_counter() - t1, 1)}
                log(f"  {key}: size {rel_d['size']:.4f}, spearman {value_d:.4f} (drop "
                    f"{scorer.drop(value_d):.4f}), held-out KL/MSE "
                    f"{summary['held_out_loss_before']:.4g} -> "
                    f"{summary['held_out_loss_after']:.4g} (kept {summary['kept']}), "
                    f"{summary['trained_params']:,} params, step {summary['step_seconds']:.3f} s")
            rows.append(row)
            out = {"original": scorer.original, "metric": scorer.label, "steps": args.steps,
                   "lr": lr, "calibration_batches": len(ctx.calibration_batches),
                   "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
