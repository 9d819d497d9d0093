"""WordSim-353 Spearman of compiled MiniLM artifacts (the built libraries, not their IR).

Why: the budget search scores candidates on the compressed IR; what ships is the TVM
artifact (W8A8's int8 kernels, its fused epilogues), so the table of a ``--budget latency=``
pick needs the artifact's own score beside fp32's. Same evaluator as ``slimc compile --eval
spearman`` (``slimc.task_eval``: mean-pooled token states, cosine, Spearman against the gold
scores), run on each artifact in turn on this host:

    .venv/bin/python benchmarks/artifact_spearman.py DIR [DIR ...] [--out NAME]

Quality only (no timing: run outside bench.sh). Writes benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.budget_minilm import MODEL, data  # noqa: E402
from benchmarks.prune_common import RESULTS  # noqa: E402


def artifact_spearman(directory: Path, pairs: Path, threads: int = 2,
                      eval_batches: int = 16) -> float:
    """The artifact's Spearman on ``pairs`` with the compile's evaluator and batch shapes."""
    import slimc
    from slimc import task_eval
    from slimc.plugins import get_registry

    model = slimc.load(directory, threads=threads)
    template = model.example_inputs()
    ctx = task_eval.EvalContext(input_names=list(template), template=template,
                                model_dir=MODEL, max_batches=eval_batches)
    task = task_eval.prepare("spearman", pairs, ctx, get_registry().evaluators)
    return task.measure("artifact", model.run_arrays)["spearman"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--tmp", default="/tmp/budget_bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="artifact_spearman")
    args = ap.parse_args()
    pairs, _ = data(Path(args.tmp))
    out = {}
    for d in args.dirs:
        out[d] = artifact_spearman(Path(d), pairs, args.threads)
        print(d, f"{out[d]:.4f}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
