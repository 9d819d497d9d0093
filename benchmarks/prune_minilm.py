"""all-MiniLM-L6-v2 structured pruning: WordSim-353 Spearman of mean-pooled embeddings.

slimc's ``prune`` pass versus Torch-Pruning at the same parameter budget (fraction of *all*
parameters of the encoder: embeddings + 6 layers; the unused pooler is not counted), the same
calibration data (KJV verses, Genesis..Exodus) and the same evaluation (WordSim-353 word pairs,
cosine of mean-pooled last hidden states vs. the human score, Spearman).

About half of MiniLM's parameters are the 30522x384 token embedding, so removing 50% of all
parameters needs the residual width (hidden size) too: those rows use slimc ``granularity=all,
outputs=prune`` (the embedding gets narrower, as it does in Torch-Pruning when it prunes the
hidden size).

    python benchmarks/prune_minilm.py   # ~25 min at 2 threads on a heavily shared host
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.prune_common import (
    count_params,
    kjv,
    set_threads,
    slimc_prune,
    spearman,
    table,
    tp_prune_to,
    wordsim353,
    write_json,
)

BATCH, SEQ = 32, 32


def load():
    import transformers

    from benchmarks.models import _Select, minilm_dir

    path = minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return tok, model, _Select


def batches(tok, texts: list[str]) -> list[dict[str, torch.Tensor]]:
    """Fixed-shape (BATCH x SEQ) batches; the last one padded with empty strings."""
    out = []
    for i in range(0, len(texts), BATCH):
        chunk = texts[i:i + BATCH]
        chunk = chunk + [""] * (BATCH - len(chunk))
        enc = tok(chunk, padding="max_length", truncation=True, max_length=SEQ,
                  return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def embed(run, data: list[dict[str, torch.Tensor]], n: int) -> torch.Tensor:
    vecs = []
    with torch.no_grad():
        for b in data:
            h = run(b)
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            vecs.append((h * m).sum(1) / m.sum(1).clamp(min=1))
    return torch.cat(vecs)[:n]


def wordsim_score(run, tok, pairs) -> float:
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    index = {w: i for i, w in enumerate(words)}
    vec = embed(run, batches(tok, words), len(words))
    sims = [float(torch.nn.functional.cosine_similarity(vec[index[a]], vec[index[b]], dim=0))
            for a, b, _ in pairs]
    return spearman(sims, [s for _, _, s in pairs])


def tp_minilm(model, select, calib, fraction: float, importance: str, width: bool):
    """Torch-Pruning's recipe for HF BERT (its examples/transformers/prune_hf_bert.py): whole
    heads (``prune_num_heads``), MLP channels, and the hidden size when ``width``."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    goal = int((count_params(model) - count_params(model.pooler)) * (1 - fraction))
    example = calib[0]
    big = {k: torch.cat([b[k] for b in calib]) for k in example}

    def fresh():
        bert = copy.deepcopy(model)
        bert.pooler = None  # unused by sentence embeddings; not counted for either tool
        return select(bert, "last_hidden_state").eval()

    def build(wrapped, ratio):
        bert = wrapped.model
        num_heads = {}
        for m in bert.modules():
            if isinstance(m, BertSelfAttention):
                for lin in (m.query, m.key, m.value):
                    num_heads[lin] = m.num_attention_heads
        imp = {"magnitude": tp.importance.GroupMagnitudeImportance(p=2),
               "activation": tp.importance.ActivationImportance(p=2)}[importance]
        ignored = [] if width else [bert.embeddings.word_embeddings]
        pruner = tp.pruner.MetaPruner(
            wrapped, example, importance=imp, pruning_ratio=ratio, global_pruning=False,
            ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True,
            prune_head_dims=False, head_pruning_ratio=ratio, round_to=8)
        if importance == "activation":
            with imp.compute_importance(wrapped), torch.no_grad():
                wrapped(**big)
        return pruner

    def fix(wrapped, pruner):
        for m in wrapped.modules():
            if isinstance(m, BertSelfAttention):
                m.num_attention_heads = m.query.out_features // m.attention_head_size
                m.all_head_size = m.query.out_features

    return tp_prune_to(fresh, build, goal, fix, steps=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", default="Genesis1:1-Exodus40:38")
    ap.add_argument("--calib-verses", type=int, default=256)
    ap.add_argument("--fractions", default="0.3,0.5",
                    help="fractions of all parameters to remove (0.3 -> 70%% kept)")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--out", default="prune_minilm.json")
    args = ap.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)

    tok, model, select = load()
    pairs = wordsim353()
    verses = kjv(args.calib)
    step = max(1, len(verses) // args.calib_verses)
    calib = batches(tok, verses[::step][:args.calib_verses])
    wrapped = select(model, "last_hidden_state").eval()
    dense_params = count_params(model) - count_params(model.pooler)
    rows = [{"method": "dense", "structures": "-", "criterion": "-", "recon": "-",
             "params": dense_params, "kept": 1.0,
             "spearman": wordsim_score(lambda b: wrapped(**b), tok, pairs), "seconds": 0.0}]
    print(table(rows, list(rows[0])), flush=True)

    for fraction in [float(f) for f in args.fractions.split(",")]:
        width = fraction > 0.35  # the encoder alone is ~47% of the parameters
        gran = {"granularity": "all", "outputs": "prune"} if width else {"granularity": "auto"}
        structures = "heads+mlp+width" if width else "heads+mlp"
        for criterion in ("activation", "magnitude"):
            for recon in (("none", "lsq") if criterion == "activation" else ("none",)):
                opts = dict(ratio=fraction, budget="params", criterion=criterion,
                            reconstruct=recon, **gran)
                ir, before, after, secs = slimc_prune(wrapped, calib[0], calib, opts)
                score = wordsim_score(lambda b, ir=ir: ir.run(
                    [b[n] for n in ir.input_names])[0], tok, pairs)
                rows.append({"method": "slimc", "structures": structures,
                             "criterion": criterion, "recon": recon, "params": after,
                             "kept": after / before, "spearman": score, "seconds": secs})
                print(table(rows[-1:], list(rows[0])), flush=True)
        if args.no_tp:
            continue
        for criterion in ("activation", "magnitude"):
            t0 = time.perf_counter()
            pruned, ratio, n = tp_minilm(model, select, calib, fraction, criterion, width)
            score = wordsim_score(lambda b, p=pruned: p(**b), tok, pairs)
            rows.append({"method": f"torch-pruning (ratio {ratio:.3f})",
                         "structures": structures, "criterion": criterion, "recon": "none",
                         "params": n, "kept": n / dense_params, "spearman": score,
                         "seconds": time.perf_counter() - t0})
            print(table(rows[-1:], list(rows[0])), flush=True)

    print()
    print(table(rows, list(rows[0])))
    path = write_json(args.out, {"model": "all-MiniLM-L6-v2", "eval": "WordSim-353 Spearman",
                                 "calibration": f"KJV {args.calib}, {args.calib_verses} verses",
                                 "batch": [BATCH, SEQ], "threads": args.threads, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
