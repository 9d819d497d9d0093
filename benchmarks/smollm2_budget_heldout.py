"""The artifact of a SmolLM2 ``--budget`` search scored on text the search never saw.

``slimc compile ... --budget size=0.13 --eval perplexity --eval-data john.txt`` measures its
candidates on John and reports the chosen one's perplexity on John: selection and report on the
same text. This script scores the written artifact and the fp32 model (PyTorch) on other KJV
books, with the artifact's own input shape (batch x sequence windows, as slimc's perplexity
evaluator cuts them), so the ratio is free of that selection.

    .venv/bin/python benchmarks/smollm2_budget_heldout.py ARTIFACT MODEL_DIR \
        --books "Mark1:1-16:20" "Romans1:1-16:27" --batches 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.prune_common import kjv  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", type=Path)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--books", nargs="+", default=["Mark1:1-16:20", "Romans1:1-16:27"])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch
    import transformers

    import slimc
    from slimc.task_eval import EvalContext, _prepare_perplexity

    artifact = slimc.load(args.artifact)
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    shapes = {i["name"]: (i["shape"], i["dtype"]) for i in manifest["inputs"]}
    template = {name: np.zeros(shape, dtype=dtype) for name, (shape, dtype) in shapes.items()}
    ctx = EvalContext(list(template), template, str(args.model_dir), args.batches)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir,
                                                              torch_dtype=torch.float32).eval()
    names = list(template)

    def torch_fn(arrays):
        feed = {n: torch.from_numpy(a) for n, a in zip(names, arrays, strict=True)}
        with torch.no_grad():
            return [model(**feed).logits.numpy()]

    rows = []
    for book in args.books:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n".join(kjv(book)))
        task = _prepare_perplexity(Path(f.name), ctx)
        fp32 = task.score([torch_fn(b) for b in task.batches])["perplexity"]
        art = task.score([artifact.run_arrays(b) for b in task.batches])["perplexity"]
        rows.append({"book": book, "note": task.note, "fp32": fp32, "artifact": art,
                     "ratio": art / fp32})
        print(f"{book}: {task.note}: fp32 {fp32:.3f}, artifact {art:.3f}, "
              f"ratio {art / fp32:.4f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
