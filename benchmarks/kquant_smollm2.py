"""Would a format that keeps SmolLM2's Q4_1 codes with cheaper scales pay off? (issue 17)

The GGUF stores the 210 linears as Q4_1: 4-bit codes with an fp16 scale ``d`` and minimum
``m`` per 32 weights (5 bits per weight). A K-quant-style format keeps the codes and stores
``d`` and ``m`` per group in ``b`` bits under one fp16 scale pair per row (llama.cpp's Q4_K:
6-bit per 32 under fp16 per 256): ``4 + 2b/32 + 32/K`` bits per weight. This script
*emulates* that format in PyTorch (no kernel exists: the weights are rebuilt from the rounded
parameters and scored in fp32) to see what it loses before anyone builds it:

* codes and ``(d, m)`` are recovered exactly from the fp32 weights (Q4_1 sets ``d = (max -
  min) / 15`` and ``m = min`` per block, so every block holds codes 0 and 15);
* ``d`` is rounded to ``b`` unsigned bits of ``max(d) / (2^b - 1)`` per row; then ``m`` is
  refit to the group's least-squares value given the rounded ``d`` (``mean(w - q d')``) and
  rounded to ``b`` signed bits of ``max|m| / (2^(b-1) - 1)`` per row.

The embedding / output head (Q8_0 in the GGUF) is left fp32 here: these rows isolate the
linears' loss. Evaluation as ``budget_smollm2.py``: KJV John, 128-token windows.

    .venv/bin/python benchmarks/kquant_smollm2.py --bits 8 6 4 --fp32-perplexity 23.356
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.prune_common import kjv, write_json  # noqa: E402
from benchmarks.prune_smollm2 import chunks, load, perplexity  # noqa: E402

GROUP = 32


def q4_1_parts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Codes [N, G, 32], d [N, G], m [N, G] of Q4_1-dequantized ``w`` and the largest
    relative error of rebuilding ``w`` from them (0 when ``w`` is on its Q4_1 grid)."""
    n, k = w.shape
    g = w.double().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    d = (hi - lo) / 15
    codes = torch.where(d[..., None] > 0, torch.round((g - lo[..., None]) /
                                                      d[..., None].clamp_min(1e-30)), 0)
    rebuilt = codes * d[..., None] + lo[..., None]
    err = float((rebuilt - g).abs().max() / g.abs().max())
    return codes, d, lo, err


def kquant(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    """``w`` rebuilt from its Q4_1 codes with ``bits``-bit per-group scale and minimum under
    an fp16 pair per row; returns (weights, largest code rebuild error)."""
    codes, d, m, err = q4_1_parts(w)
    dmax = d.amax(-1, keepdim=True).half().double()
    dstep = dmax / ((1 << bits) - 1)
    d2 = torch.round(d / dstep).clamp(0, (1 << bits) - 1) * dstep
    g = w.double().reshape(codes.shape)
    m_fit = (g - codes * d2[..., None]).mean(-1)
    mstep = (m_fit.abs().amax(-1, keepdim=True) / ((1 << (bits - 1)) - 1)).half().double()
    lim = (1 << (bits - 1)) - 1
    m2 = torch.round(m_fit / mstep).clamp(-lim, lim) * mstep
    del m
    return (codes * d2[..., None] + m2[..., None]).reshape(w.shape).float(), err


def bits_per_weight(bits: int, k: int) -> float:
    return 4 + 2 * bits / GROUP + 32 / k


def weight_errors(formats: list[str], bits: list[int],
                  blocks: list[int] | None = None) -> dict[str, float]:
    """Relative squared weight error over all 210 linears, read from the GGUF itself (no
    model, < 1 GB): the K-quant emulation at ``bits`` beside slimc's formats (RTN, searched
    grids) on the same Q4_1 weights. A proxy only: no activations weigh the error."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from slimc.passes.quantize.formats import fake_quantize, parse_format

    from benchmarks.prune_smollm2 import smollm2_path

    root, name = smollm2_path()
    reader = GGUFReader(root / name)
    err = {f: 0.0 for f in formats} | {f"kquant-{b}bit": 0.0 for b in bits}
    energy, count = 0.0, 0
    for t in reader.tensors:
        if not t.name.startswith("blk.") or t.name.endswith("norm.weight"):
            continue
        if blocks is not None and int(t.name.split(".")[1]) not in blocks:
            continue
        w = torch.from_numpy(np.ascontiguousarray(
            dequantize(t.data, t.tensor_type))).float().reshape(-1, int(t.shape[0]))
        energy += float((w.double() ** 2).sum())
        count += w.numel()
        for f in formats:
            err[f] += float(((fake_quantize(w, parse_format(f)) - w).double() ** 2).sum())
        for b in bits:
            err[f"kquant-{b}bit"] += float(((kquant(w, b)[0] - w).double() ** 2).sum())
    print(f"{count / 1e6:.2f} M linear weights", flush=True)
    return {k: v / energy for k, v in err.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, nargs="*", default=None,
                    help="--weights-only: these transformer blocks only (the searched grids "
                    "take minutes per block on a loaded host)")
    ap.add_argument("--weights-only", action="store_true",
                    help="only the weight-error proxy from the GGUF (no model, no perplexity)")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4])
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--fp32-perplexity", type=float, default=None)
    ap.add_argument("--out", default="kquant_smollm2.json")
    args = ap.parse_args()
    if args.weights_only:
        formats = ["int4-g32-fz", "int4-g64-fz", "int4-g128-fz", "int3-g32", "int3-g64"]
        rel = weight_errors(formats, args.bits, args.blocks)
        for k, v in rel.items():
            print(f"{k}: relative squared weight error {v:.3e}", flush=True)
        write_json(args.out, {"note": "relative squared weight error over SmolLM2's 210 "
                              "Q4_1 linears (GGUF), RTN / searched grids; no activations",
                              "blocks": args.blocks or "all",
                              "errors": rel})
        return
    torch.manual_seed(0)
    tok, model, _ = load()
    held_out = chunks(tok, " ".join(kjv("John1:1-21:25")), 128, 4, args.eval_tokens)

    def score() -> float:
        return perplexity(lambda b: model(input_ids=b["input_ids"], use_cache=False).logits,
                          held_out)

    fp32 = args.fp32_perplexity or score()
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    original = {n: m.weight.detach().clone() for n, m in linears.items()}
    total = sum(w.numel() for w in original.values())
    rows = [{"row": "fp32 (= the Q4_1 codes with their fp16 d, m: 5 bits)", "bits": 5.0,
             "perplexity": fp32, "ratio": 1.0}]
    print(f"fp32 {fp32:.3f}; {len(linears)} linears, {total / 1e6:.2f} M weights", flush=True)
    for bits in args.bits:
        t0 = time.perf_counter()
        worst, bpw, rel = 0.0, 0.0, 0.0
        with torch.no_grad():
            for n, m in linears.items():
                w = original[n]
                w2, err = kquant(w, bits)
                worst = max(worst, err)
                rel += float(((w2 - w) ** 2).sum() / (w ** 2).sum()) * w.numel()
                bpw += bits_per_weight(bits, w.shape[1]) * w.numel()
                m.weight.copy_(w2)
        ppl = score()
        row = {"row": f"Q4_1 codes, {bits}-bit scale and minimum per 32, fp16 pair per row",
               "bits": bpw / total, "perplexity": ppl, "ratio": ppl / fp32,
               "weight_rel_sq_error": rel / total, "q4_1_code_recovery_max_rel_error": worst,
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(row, flush=True)
    write_json(args.out, {"fp32_perplexity": fp32, "eval": "KJV John, 128-token windows",
                          "note": "emulated in fp32 (no kernel); embedding left fp32",
                          "rows": rows})


if __name__ == "__main__":
    main()
