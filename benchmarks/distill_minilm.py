"""Recovery by distillation on real weights: all-MiniLM-L6-v2 after 40% structured pruning.

The dense encoder (``last_hidden_state``) is captured once; ``--compress`` (default
``prune{ratio=0.4,budget=params,reconstruct=lsq}``, 40% of all parameters, as in
docs/benchmarks.md's MiniLM table) runs on a clone with 256 KJV verses of Genesis-Exodus as
calibration (as ``lowrank_real.py minilm``); ``distill`` then trains it against the dense IR
(``PassContext.original``, relative-MSE on the hidden states) on verses of
Leviticus-Deuteronomy (disjoint text), and WordSim-353 Spearman is measured before and after.

    python benchmarks/distill_minilm.py --threads 1 --distill 'distill{steps=150,lr=1e-4}'
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.prune_common import kjv, set_threads, wordsim353, write_json  # noqa: E402


def main() -> None:
    from benchmarks.lowrank_real import capture_ir, run_pipeline
    from benchmarks.prune_minilm import batches, load, wordsim_score
    from slimc.passmanager import PassContext, PassManager
    from slimc.pipeline import parse_pipeline_text, validate
    from slimc.plugins import get_registry

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compress", default="prune{ratio=0.4,budget=params,reconstruct=lsq}")
    ap.add_argument("--calib", default="Genesis1:1-Exodus40:38")
    ap.add_argument("--distill", default="distill{steps=150,lr=1e-4}")
    ap.add_argument("--distill-text", default="Leviticus1:1-Deuteronomy34:12")
    ap.add_argument("--distill-verses", type=int, default=1536)
    ap.add_argument("--out", default="distill_minilm.json")
    args = ap.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)

    tok, model, select = load()
    pairs = wordsim353()
    verses = kjv(args.calib)
    calib = batches(tok, verses[::max(1, len(verses) // 256)][:256])
    more = kjv(args.distill_text)
    train = batches(tok, more[::max(1, len(more) // args.distill_verses)]
                    [:args.distill_verses])
    dense, inputs = capture_ir(select(model, "last_hidden_state").eval(), calib[0])

    def score(work) -> float:
        return wordsim_score(lambda b: work.run([b[n] for n in work.input_names])[0], tok,
                             pairs)

    rows = [{"model": "dense", "params": dense.num_params(), "spearman": score(dense)}]
    print(rows[-1], flush=True)
    compressed, secs = run_pipeline(dense, inputs, calib, args.compress)
    rows.append({"model": args.compress, "params": compressed.num_params(),
                 "spearman": score(compressed), "seconds": secs})
    print(rows[-1], flush=True)
    registry = get_registry()
    ctx = PassContext(example_inputs=inputs, verify=False, log=lambda m: print(m, flush=True))
    ctx.calibration_batches = [[b[n] for n in compressed.input_names] for b in train]
    ctx.original = dense
    t0 = time.perf_counter()
    PassManager(registry.passes).run(
        compressed, validate(parse_pipeline_text(args.distill), registry.passes), ctx)
    summary = compressed.annotations["distill"]
    rows.append({"model": f"{args.compress} + {args.distill}",
                 "params": compressed.num_params(), "spearman": score(compressed),
                 "seconds": time.perf_counter() - t0,
                 "held_out_loss_before": summary["held_out_loss_before"],
                 "held_out_loss_after": summary["held_out_loss_after"]})
    print(rows[-1], flush=True)
    meta = {"model": "all-MiniLM-L6-v2", "threads": args.threads,
            "eval": "WordSim-353 Spearman (mean-pooled last_hidden_state)",
            "calibration": f"KJV {args.calib}, 256 verses",
            "distill_data": f"KJV {args.distill_text}, {len(train)} batches of 32 verses "
                            f"({summary['held_out_batches']} held out)",
            "distill_summary": summary}
    print(f"wrote {write_json(args.out, {**meta, 'rows': rows})}")


if __name__ == "__main__":
    main()
