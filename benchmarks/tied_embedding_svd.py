"""Why factorizing SmolLM2's tied embedding table wrecks it: plain truncated SVD of the table
(which is also the output head) in PyTorch, outside slimc, and the perplexity it leaves.

    python benchmarks/tied_embedding_svd.py --ranks 544,512 --eval-tokens 512
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.prune_common import kjv  # noqa: E402
from benchmarks.prune_smollm2 import chunks, load, perplexity  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[544, 512])
    ap.add_argument("--eval-tokens", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok, model, _ = load()
    data = chunks(tok, " ".join(kjv("John1:1-21:25")), 256, 1, args.eval_tokens)
    table = model.get_input_embeddings().weight
    print("tied to lm_head:", model.lm_head.weight.data_ptr() == table.data_ptr())

    def run(b):
        return model(input_ids=b["input_ids"]).logits

    with torch.no_grad():
        print(f"dense ppl {perplexity(run, data):.2f}")
        u, s, vh = torch.linalg.svd(table.detach().double(), full_matrices=False)
        dense = table.detach().clone()
        for r in args.ranks:
            table.data.copy_(((u[:, :r] * s[:r]) @ vh[:r]).float())
            kept = float((s[:r] ** 2).sum() / (s ** 2).sum())
            print(f"rank {r}: {kept:.4f} of sum sigma^2 kept, ppl {perplexity(run, data):.2f}")
        table.data.copy_(dense)


if __name__ == "__main__":
    main()
