"""Study (issue 17, session 28): does spending a budget's slack on the best uniform format's
most damaged layers beat that format on MiniLM / WordSim-353? (what ``Search.refine`` does)

    .venv/bin/python benchmarks/minilm_uniform_upgrades.py

Uniform int4-g32-fz, then its k most damaged layers (the damage table's, RTN rounding) at fp32
or int8, then the knapsack restricted to {int4-g32-fz, int8, fp32} and {int4-g32-fz, fp32} at
size 0.5 and 0.25; each scored on WordSim-353 (Spearman, on the compressed IR). Writes
benchmarks/results/session28/minilm_uniform_upgrades.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.budget_minilm import wordsim_search_context  # noqa: E402

OUT = ROOT / "benchmarks/results/session28/minilm_uniform_upgrades.json"
RESTRICTED = {"fz/int8/fp32": ("int4-g32-fz", "int8", "fp32"), "fz/fp32": ("int4-g32-fz", "fp32")}


def main() -> None:
    from slimc.passes.analysis.hardware import hardware_for_target

    from slimc.search.driver import _fastest_torch_threads
    from slimc.search.search import Search
    from slimc.search.space import Techniques

    registry, ir, example, ctx, scorer = wordsim_search_context(Path("/tmp/budget_bench"), 1)
    print("fp32", scorer.original, flush=True)
    scores: dict[str, tuple[float, float]] = {}
    with _fastest_torch_threads(ir, ctx.calibration(1)[0]):
        search = Search(ir, ctx, registry, Techniques.named("precision"), scorer,
                        hardware_for_target(ctx.target))
        base = search.base(0.0)
        space = base.space
        names = [[str(o) for o in c.options] for c in space.layers]
        width = space.damage.shape[1]
        fz = [n.index("int4-g32-fz") for n in names]
        int8 = [n.index("int8") for n in names]

        def run(label: str, picks) -> None:
            cand = search.build(base, picks)
            scores[label] = (round(cand.relative["size"], 4), round(cand.value, 4))
            print(label, scores[label], flush=True)

        run("uniform int4-g32-fz", fz)
        order = sorted(range(len(fz)), key=lambda i: -space.damage[i, fz[i]])
        for k in (1, 2, 4, 8):
            for label, upgrade in (("fp32", [0] * len(fz)), ("int8", int8)):
                picks = list(fz)
                for i in order[:k]:
                    picks[i] = upgrade[i]
                run(f"int4-g32-fz + top{k} damaged at {label}", picks)
        for budget in (0.5, 0.25):
            for label, allowed in RESTRICTED.items():
                barred = np.array([[o not in allowed for o in n] + [True] * (width - len(n))
                                   for n in names])
                run(f"knapsack {label} at size {budget}",
                    search.solve(base, {"size": budget}, barred))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"fp32": scorer.original, "scores": scores,
                               "most_damaged": [space.layers[i].layer.name
                                                for i in order[:8]]}, indent=1))


if __name__ == "__main__":
    main()
