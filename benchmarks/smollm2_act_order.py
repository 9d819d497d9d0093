"""GPTQ act-order (static groups) vs plain GPTQ on real SmolLM2-135M layers (issue 17).

Per layer: the relative output error ``tr((W-Q) H (W-Q)^T) / tr(W H W^T)`` on the calibration
Hessian (KJV Genesis), for a few layers and the formats of recipe H4 (attention int4-g128-fz,
gate/up int3-g64). A cheap proxy where a full perplexity row did not fit the session.

    .venv/bin/python benchmarks/smollm2_act_order.py --calib-tokens 2048
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.prune_common import kjv  # noqa: E402
from benchmarks.prune_smollm2 import chunks  # noqa: E402
from benchmarks.smollm2_levers import RESULTS, _gptq_round_trip, hessians  # noqa: E402
from passes.quantize.formats import parse_format  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="/tmp/mem-bench/smollm2-135m")
    ap.add_argument("--calib", default="Genesis1:1-50:26")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--blocks", default="0,15,29")
    ap.add_argument("--out", default="smollm2_levers/act_order_layers.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir,
                                                              dtype=torch.float32).eval()
    calib = chunks(tok, " ".join(kjv(args.calib)), 128, 4, args.calib_tokens)
    picks = {f"model.layers.{b}.{p}": f for b in args.blocks.split(",")
             for p, f in (("self_attn.q_proj", "int4-g128-fz"),
                          ("self_attn.o_proj", "int4-g128-fz"),
                          ("mlp.gate_proj", "int3-g64"), ("mlp.down_proj", "int3-g64"))}
    mods = dict(model.named_modules())
    hess = hessians(model, calib, set(picks))
    rows = []
    for name, spec in picks.items():
        w, h, fmt = mods[name].weight.detach(), hess[name].double(), parse_format(spec)
        ref = float(torch.trace(w.double() @ h @ w.double().t()))
        err = {}
        for ao in (False, True):
            d = (w - _gptq_round_trip(w, fmt, hess[name], 0.01, ao)).double()
            err[ao] = float(torch.trace(d @ h @ d.t())) / ref
        rows.append({"layer": name, "format": spec, "gptq": err[False], "gptq_act_order":
                     err[True], "ratio": err[True] / err[False]})
        print(f"{name} {spec}: GPTQ {err[False]:.4e}, act-order {err[True]:.4e} "
              f"({err[True] / err[False]:.3f}x)", flush=True)
    out = RESULTS / args.out
    out.write_text(json.dumps({"calibration": f"KJV {args.calib}, {args.calib_tokens} tokens",
                               "error": "tr((W-Q) H (W-Q)^T) / tr(W H W^T)", "rows": rows},
                              indent=1))


if __name__ == "__main__":
    main()
