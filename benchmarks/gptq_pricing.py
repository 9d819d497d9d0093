"""How wrong the damage table's round-to-nearest pricing is for candidates built with GPTQ, and
what GPTQ act-order adds (cost and benefit), per layer on a real model (issue 17).

The ``--budget`` search prices every (layer, format) by the local output error of the
round-to-nearest weight, ``tr(dW G dW^T) / tr(W G W^T)`` on the calibration inputs, mapped to
end-to-end damage by the layer's measured propagation line (docs/budget.md); with ``--calib``
its candidates are then built with ``quantize{method=gptq}``. This measures, per layer and
format on the same calibration Gram matrix: the RTN error the table prices, plain GPTQ's and
act-order GPTQ's (``act_order=true``), and the seconds each GPTQ takes (side by side in one
process, the two alternating per layer). ``ratio`` = GPTQ / RTN is the factor the table
over-prices a GPTQ-built choice by (the propagation line's slope is ~1 in log-log, so the
damage is over-priced by about the same factor).

    .venv/bin/python benchmarks/gptq_pricing.py --model minilm
    .venv/bin/python benchmarks/gptq_pricing.py --model smollm2 --blocks 0,10,20,29

Writes benchmarks/results/gptq_pricing_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.budget_minilm import MODEL as MINILM  # noqa: E402
from benchmarks.prune_common import RESULTS, kjv  # noqa: E402
from benchmarks.smollm2_levers import _gptq_round_trip  # noqa: E402
from passes.quantize.formats import fake_quantize, parse_format  # noqa: E402

SMOLLM2 = "/tmp/mem-bench/smollm2-135m"
FORMATS = ("int4-g128-fz", "int4-g128", "int3-g64", "int3-g128", "int2-g64")


@torch.no_grad()
def grams(model, batches, modules: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
    """``X^T X`` (float64) of each linear's input over ``batches``."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in modules.items():
        def record(_mod, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.t() @ x
        hooks.append(mod.register_forward_pre_hook(record))
    for b in batches:
        model(**b)
    for h in hooks:
        h.remove()
    return sums


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    ap.add_argument("--calib", default="Genesis1:1-3:24")
    ap.add_argument("--held-out", default="Exodus1:1-4:31", help="text the errors are also "
                    "measured on (GPTQ never sees it): in-sample errors flatter GPTQ")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=8, help="tokens per row (MiniLM: the "
                    "search's 32x8 batches); 128 for SmolLM2")
    ap.add_argument("--blocks", default="", help="SmolLM2: blocks to measure (default all)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    path = MINILM if args.model == "minilm" else SMOLLM2
    tok = transformers.AutoTokenizer.from_pretrained(path)
    cls = transformers.AutoModel if args.model == "minilm" else \
        transformers.AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    def batches_of(spec: str) -> tuple[list[dict[str, torch.Tensor]], int]:
        ids = tok(" ".join(kjv(spec)), return_tensors="pt")["input_ids"][0]
        rows = min(len(ids), args.tokens) // args.seq
        ids = ids[:rows * args.seq].reshape(rows, args.seq)
        return [{"input_ids": ids[i:i + 32]} for i in range(0, rows, 32)], rows

    batches, rows = batches_of(args.calib)
    held_batches, _ = batches_of(args.held_out)
    blocks = {b for b in args.blocks.split(",") if b}
    modules = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"
               and (not blocks or any(f".{b}." in f".{n}." for b in blocks))}
    t0 = time.perf_counter()
    gram = grams(model, batches, modules)
    held = grams(model, held_batches, modules)
    gram_s = time.perf_counter() - t0
    out_rows = []
    formats = [f for f in args.formats.split(",") if f]
    for i, (name, mod) in enumerate(modules.items()):
        w = mod.weight.detach()
        g = gram[name]
        h = (2.0 / (rows * args.seq) * g).float()
        def err(q: torch.Tensor, g: torch.Tensor = g, w: torch.Tensor = w) -> float:
            d, wd = (w - q).double(), w.double()
            return float(((d @ g) * d).sum()) / float(((wd @ g) * wd).sum())

        for spec in formats:
            fmt = parse_format(spec)
            rtn = fake_quantize(w, fmt)
            row = {"layer": name, "format": spec, "rtn": err(rtn),
                   "held_out_rtn": err(rtn, held[name])}
            order = (False, True) if (i % 2 == 0) else (True, False)
            for ao in order:
                t = time.perf_counter()
                q = _gptq_round_trip(w, fmt, h, 0.01, ao)
                key = "act_order" if ao else "gptq"
                row["seconds_" + key] = time.perf_counter() - t
                row[key] = err(q)
                row["held_out_" + key] = err(q, held[name])
            row["gptq/rtn"] = row["gptq"] / row["rtn"]
            row["act_order/gptq"] = row["act_order"] / row["gptq"]
            row["held_out gptq/rtn"] = row["held_out_gptq"] / row["held_out_rtn"]
            row["held_out act_order/gptq"] = row["held_out_act_order"] / row["held_out_gptq"]
            out_rows.append(row)
        print(f"{name}: " + ", ".join(f"{r['format']} gptq/rtn {r['gptq/rtn']:.2f} "
                                      f"(held out {r['held_out gptq/rtn']:.2f}) ao/gptq "
                                      f"{r['act_order/gptq']:.2f} "
                                      f"({r['held_out act_order/gptq']:.2f})"
                                      for r in out_rows[-len(formats):]), flush=True)
    summary = {}
    for spec in formats:
        rs = [r for r in out_rows if r["format"] == spec]
        summary[spec] = {
            "layers": len(rs),
            "gptq/rtn median": statistics.median(r["gptq/rtn"] for r in rs),
            "gptq/rtn min": min(r["gptq/rtn"] for r in rs),
            "gptq/rtn max": max(r["gptq/rtn"] for r in rs),
            "act_order/gptq median": statistics.median(r["act_order/gptq"] for r in rs),
            "act_order/gptq min": min(r["act_order/gptq"] for r in rs),
            "act_order/gptq max": max(r["act_order/gptq"] for r in rs),
            **{f"held_out {k} {f.__name__}": f(r[f"held_out {k}"] for r in rs)
               for k in ("gptq/rtn", "act_order/gptq")
               for f in (statistics.median, min, max)},
            "seconds gptq": sum(r["seconds_gptq"] for r in rs),
            "seconds act_order": sum(r["seconds_act_order"] for r in rs),
        }
    result = {"model": args.model, "calibration": f"KJV {args.calib}, {rows * args.seq} "
              f"tokens in rows of {args.seq}", "held_out": f"KJV {args.held_out}",
              "error": "tr(dW G dW^T) / tr(W G W^T)",
              "gram_seconds": gram_s, "summary": summary, "rows": out_rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"gptq_pricing_{args.model}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
