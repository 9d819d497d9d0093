"""The budget search's damage table: local error + end-to-end anchors vs every choice end to
end, on real all-MiniLM-L6-v2 (WordSim-353 Spearman).

One process, both methods on the same captured model, calibration batch and choice space
(every technique: 7 formats, low-rank 50%/25% with int8/int4 factors; prune ratio 0); each
method starts with an empty low-bit grid cache. Prints: time and whole-model forwards of each
table, Spearman rank correlation of the two tables (all entries; per layer across its
choices; per choice across layers), and for each size budget the knapsack pick of each table,
built through the real passes and scored on WordSim-353 (precision family, no back-off).

    .venv/bin/python benchmarks/damage_table.py [--budgets size=0.5 ...] [--anchors 2]

Writes benchmarks/results/damage_table.json.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", nargs="*",
                    default=["size=0.5", "size=0.25", "size=0.15", "size=0.1"])
    ap.add_argument("--anchors", type=int, default=2)
    ap.add_argument("--techniques", default="all")
    args = ap.parse_args()
    import numpy as np
    from scipy.stats import spearmanr
    from slimc.passes.analysis.hardware import hardware_for_target

    import slimc.lowbit as lowbit
    import slimc.search.space as space_mod
    from slimc.search.budget import parse_budget
    from slimc.search.driver import _fastest_torch_threads
    from slimc.search.search import Search
    from slimc.search.solver import Infeasible
    from slimc.search.space import Techniques

    registry, ir, example, ctx, scorer = wordsim_search_context(Path("/tmp/budget_bench"), 1)
    hw = hardware_for_target(ctx.target)
    measure = space_mod.measure

    def anchored(*a, **k):
        k["anchors"] = args.anchors
        return measure(*a, **k)
    space_mod.measure = anchored
    out: dict = {"original": scorer.original, "anchors": args.anchors, "methods": {}}
    searches = {}
    with _fastest_torch_threads(ir, ctx.calibration(1)[0]):
        for method in ("local", "end-to-end"):
            lowbit._GRIDS.clear()
            s = Search(ir, ctx, registry, Techniques.named(args.techniques), scorer, hw,
                       damage_method=method)
            t0 = time.perf_counter()
            base = s.base(0.0)
            seconds = time.perf_counter() - t0
            searches[method] = s
            out["methods"][method] = {"seconds": round(seconds, 1),
                                      "forwards": base.space.info["damage_forwards"]}
            print(f"{method}: {seconds:.1f} s, {base.space.info['damage_forwards']} forwards",
                  flush=True)
        a = searches["local"].base(0.0).space.damage
        b = searches["end-to-end"].base(0.0).space.damage
        live = np.isfinite(b) & (b > 0)
        overall = spearmanr(a[live], b[live]).statistic
        per_layer = [spearmanr(a[i][live[i]], b[i][live[i]]).statistic
                     for i in range(len(a)) if live[i].sum() > 2]
        per_choice = [spearmanr(a[:, j][live[:, j]], b[:, j][live[:, j]]).statistic
                      for j in range(a.shape[1]) if live[:, j].sum() > 2]
        out["rank_correlation"] = {"all": overall,
                                   "per_layer_median": float(np.nanmedian(per_layer)),
                                   "per_layer_min": float(np.nanmin(per_layer)),
                                   "per_choice_median": float(np.nanmedian(per_choice)),
                                   "per_choice_min": float(np.nanmin(per_choice))}
        print(json.dumps(out["rank_correlation"]), flush=True)
        out["budgets"] = {}
        for text in args.budgets:
            row = {}
            for method, s in searches.items():
                base = s.base(0.0)
                width = base.space.damage.shape[1]
                barred = np.array([[o.rank is not None for o in c.options]
                                   + [True] * (width - len(c.options))
                                   for c in base.space.layers])
                try:
                    picks = s.solve(base, parse_budget(text).limits(), barred)
                except Infeasible as exc:
                    row[method] = {"error": str(exc)}
                    continue
                cand = s.build(base, picks)
                row[method] = {"size": cand.relative["size"], "value": cand.value,
                               "share": cand.value / scorer.original, "choices": cand.choices}
            out["budgets"][text] = row
            print(text, json.dumps(row), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "damage_table.json").write_text(json.dumps(out, indent=1, default=str))
    print(f"\nfp32 Spearman {scorer.original:.4f}; anchors {args.anchors}\n")
    loc, e2e = out["methods"]["local"], out["methods"]["end-to-end"]
    print(f"| table | seconds | forwards |\n|---|---:|---:|\n| end-to-end | {e2e['seconds']} | "
          f"{e2e['forwards']} |\n| local + anchors | {loc['seconds']} | {loc['forwards']} |")
    print("\n| budget | end-to-end table: size, Spearman (% fp32) | local table: size, Spearman "
          "(% fp32) |\n|---|---|---|")
    for text, row in out["budgets"].items():
        cells = [f"{r['size']:.3f}, {r['value']:.4f} ({r['share']:.1%})" if "size" in r
                 else "infeasible" for r in (row["end-to-end"], row["local"])]
        print(f"| {text} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
