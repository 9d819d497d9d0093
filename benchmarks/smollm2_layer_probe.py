"""Which layers' MLP to give more bits: a per-layer probe for the SmolLM2 harness (issue 17).

wt/smol22 chose the layers whose gate/up get int4 instead of int3 by GPTQ's absolute output
error, which grows with depth; the deepest layers then bought half of the average layer's
perplexity. This probe measures instead what each choice buys: on top of a base row
(``smollm2_levers.py`` rules), one layer at a time gets ``--upgrade`` on ``--projs``, and the
KL divergence of the model's next-token distributions from the fp32 model's is measured on
text disjoint from the calibration and the evaluation (KJV Exodus by default; never John).
Layers are ranked by how much KL the upgrade removes.

    .venv/bin/python benchmarks/smollm2_layer_probe.py --out smollm2_levers/probe.json \\
        --base "table=int4-g128-fz:gptq-ao,*.gate_proj=int3-g32:kq8-ao,..."
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.prune_common import kjv  # noqa: E402
from benchmarks.prune_smollm2 import chunks  # noqa: E402
from benchmarks.smollm2_levers import (  # noqa: E402
    CACHE,
    RESULTS,
    TABLE,
    linears,
    parse_rules,
    round_trip,
    rule_for,
)
from benchmarks.smollm2_recover import kl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="/tmp/mem-bench/smollm2-135m")
    ap.add_argument("--base", required=True, help="the row's rules (smollm2_levers.py)")
    ap.add_argument("--upgrade", default="int4-g32-fz:kq8", help="FORMAT:METHOD tried per layer")
    ap.add_argument("--projs", default="mlp.gate_proj,mlp.up_proj")
    ap.add_argument("--layers", default="", help="comma-separated; default all")
    ap.add_argument("--calib", default="Genesis1:1-50:26")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--text", default="Exodus1:1-40:38")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir,
                                                              dtype=torch.float32).eval()
    batches = chunks(tok, " ".join(kjv(args.text)), 128, 4, args.tokens)
    with torch.no_grad():
        targets = [model(input_ids=b["input_ids"], use_cache=False).logits for b in batches]

    def probe_kl() -> float:
        with torch.no_grad():
            return sum(float(kl(model(input_ids=b["input_ids"], use_cache=False).logits, t))
                       for b, t in zip(batches, targets, strict=True)) / len(batches)

    mods = linears(model)
    hess = torch.load(CACHE.parent / f"hessians_{args.calib}_{args.calib_tokens}.pt")
    rules = parse_rules(args.base)
    up_rule = parse_rules(f"x={args.upgrade}")[0][1:]
    prefix = f"{args.calib}_{args.calib_tokens}_"
    original = {n: m.weight.detach().clone() for n, m in mods.items()}
    with torch.no_grad():
        for key, m in [*mods.items(), (TABLE, model.model.embed_tokens)]:
            fmt, method = rule_for(key, rules)
            m.weight.copy_(round_trip(m.weight.detach().clone(), fmt, method, hess.get(key),
                                      prefix + key, 0.1 if key == TABLE else 0.01))
    base = probe_kl()
    print(f"base KL {base:.4f}", flush=True)
    n_layers = len(model.model.layers)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else range(n_layers)
    rows = []
    for layer in layers:
        t0 = time.perf_counter()
        names = [f"model.layers.{layer}.{p}" for p in args.projs.split(",")]
        kept = {n: mods[n].weight.detach().clone() for n in names}
        with torch.no_grad():
            for n in names:
                mods[n].weight.copy_(round_trip(original[n], *up_rule,
                                                hess.get(n), prefix + n, 0.01))
        value = probe_kl()
        with torch.no_grad():
            for n in names:
                mods[n].weight.copy_(kept[n])
        rows.append({"layer": layer, "kl": value, "gain": base - value})
        print(f"layer {layer}: KL {value:.4f} (gain {base - value:.4f}, "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
    out = RESULTS / args.out
    out.write_text(json.dumps({"base": args.base, "upgrade": args.upgrade, "projs": args.projs,
                               "text": f"KJV {args.text}, {args.tokens} tokens",
                               "base_kl": base, "rows": rows,
                               "ranking": [r["layer"] for r in sorted(rows,
                                                                      key=lambda r: -r["gain"])]},
                              indent=1))


if __name__ == "__main__":
    main()
