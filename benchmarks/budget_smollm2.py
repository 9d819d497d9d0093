"""SmolLM2-135M near size 0.13 of fp32 (~4.2 bits per weight, embedding included): KJV
perplexity on held-out text for the low-bit formats, RTN and GPTQ.

Calibration: KJV Genesis 1-10 (GPTQ's Hessians); evaluation: the Gospel of John (disjoint,
held out). Every row is built through the real ``quantize`` pass on the captured IR and
scored in PyTorch on the compressed IR (an artifact matches its IR within 1e-5 rel. L2,
tests/test_lowbit.py). Size: stored weight bytes of the IR relative to fp32 (the tied
49152x576 embedding / output head counted once).

    .venv/bin/python benchmarks/budget_smollm2.py   # -> benchmarks/results/budget_smollm2.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.prune_common import kjv, write_json  # noqa: E402
from benchmarks.prune_smollm2 import Logits, chunks, load, perplexity  # noqa: E402

ROWS = {
    "int4-g32-fz, int8 embedding (the GGUF's Q4_1 grid)":
        "quantize{weights=int4,group_size=32,zero_point=float,embedding_weights=int8}",
    "int4-g64 uniform": "quantize{weights=int4,group_size=64}",
    "int3-g32 uniform, RTN": "quantize{weights=int3,group_size=32}",
    "int3-g32 uniform, GPTQ": "quantize{weights=int3,group_size=32,method=gptq}",
    "int3-g64 uniform, GPTQ": "quantize{weights=int3,group_size=64,method=gptq}",
    "int4-g64 linears + int3-g32 embedding, GPTQ":
        "quantize{weights=int4,group_size=64,method=gptq,layers=model.embed_tokens=int3-g32}",
    "int2-g64 uniform, GPTQ": "quantize{weights=int2,group_size=64,method=gptq}",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="*", default=None,
                    help="names from ROWS (default: all, or only the --pipeline rows)")
    ap.add_argument("--pipeline", action="append", default=[], metavar="NAME=PIPELINE",
                    help="an extra row (replaces --rows' default list when given)")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--out", default="budget_smollm2")
    ap.add_argument("--fp32-perplexity", type=float, default=None,
                    help="reuse a measured fp32 perplexity (same --eval-tokens) instead of "
                    "scoring the fp32 model again")
    args = ap.parse_args()
    extra = [item.partition("=")[::2] for item in args.pipeline]
    ROWS.update(extra)
    if args.rows is None:
        args.rows = [name for name, _ in extra] if extra else list(ROWS)
    from slimc.capture import capture
    from slimc.loaders.base import LoadedModel
    from slimc.passmanager import PassContext, PassManager
    from slimc.pipeline import parse_pipeline_text, validate
    from slimc.plugins import get_registry
    from slimc.targets import resolve_target

    torch.manual_seed(0)
    tok, model, _ = load()
    seq = 128
    calib = chunks(tok, " ".join(kjv("Genesis1:1-10:32")), seq, 4, 8 * seq)
    held_out = chunks(tok, " ".join(kjv("John1:1-21:25")), seq, 4, args.eval_tokens)
    registry = get_registry()
    ir, inputs = capture(LoadedModel(name="smollm2", module=Logits(model),
                                     example_inputs=dict(calib[0]), as_kwargs=True))
    del model
    ir.remove_unused_weights()
    ir.changed()

    def score(graph) -> float:
        return perplexity(lambda b: graph.run([b["input_ids"]])[0], held_out)

    base_bytes = ir.weight_bytes()
    fp32 = args.fp32_perplexity if args.fp32_perplexity else score(ir)
    rows = [{"row": "fp32", "size": 1.0, "perplexity": fp32, "ratio": 1.0}]
    print(f"fp32: perplexity {fp32:.3f}", flush=True)
    for name in args.rows:
        t0 = time.perf_counter()
        clone = ir.clone()
        ctx = PassContext(example_inputs=inputs, target=resolve_target("llvm", registry),
                          verify=False)
        ctx.calibration_batches = [[b["input_ids"]] for b in calib]
        PassManager(registry.passes).run(
            clone, validate(parse_pipeline_text(ROWS[name]), registry.passes), ctx)
        ppl = score(clone)
        row = {"row": name, "pipeline": ROWS[name], "size": clone.weight_bytes() / base_bytes,
               "perplexity": ppl, "ratio": ppl / fp32,
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"{name}: size {row['size']:.4f}, perplexity {ppl:.3f} ({ppl / fp32:.3f}x fp32)",
              flush=True)
        del clone
    write_json(args.out, {"fp32_perplexity": fp32, "eval": "KJV John, 128-token "
                                  "windows", "calibration": "KJV Genesis 1-10", "rows": rows})
    print("\n| pipeline | size (of fp32) | perplexity | x fp32 |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['row']} | {r['size']:.3f} | {r['perplexity']:.2f} | {r['ratio']:.3f} |")


if __name__ == "__main__":
    main()
