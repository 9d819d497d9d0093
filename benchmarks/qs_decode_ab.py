"""Decode-step cost of quantized group scales (issue 17): ``int4-g32-fz`` vs ``int4-g32-qs``.

The ``-qs`` artifact stores 8-bit step / minimum codes and rebuilds the fp16 grid (``N x G``
values, 1/32 of the weights) with a small kernel before each int4 kernel, every call; this
measures what that costs on a one-token forward of a SmolLM2-shaped Llama (hidden 576, MLP
1536, 4 layers, 8192-entry tied table), both artifacts loaded in one process, calls
interleaved in rounds.

    .venv/bin/python benchmarks/qs_decode_ab.py build --out /tmp/qs_ab
    /work/wt/bench.sh .venv/bin/python benchmarks/qs_decode_ab.py time --out /tmp/qs_ab
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

FORMATS = ("int4-g32-fz", "int4-g32-qs")


def decode_llama():
    """SmolLM2-135M's layer shapes (fewer layers, smaller table), one token."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                           num_attention_heads=9, num_key_value_heads=3, vocab_size=8192,
                           max_position_embeddings=64, tie_word_embeddings=True)
    model = T.LlamaForCausalLM(config).eval()
    model.config.use_cache = False
    return model, {"input_ids": torch.tensor([[17]])}


def build(out: Path) -> None:
    import slimc

    for fmt in FORMATS:
        result = slimc.compile_model("benchmarks.qs_decode_ab:decode_llama", slimc.CompileOptions(
            pipeline=f"quantize{{weights={fmt}}}", output=out / fmt, threads=1))
        m = result.manifest
        print(fmt, "verified", m["verification"]["passed"], "weight bytes",
              m["weight_bytes_after"], "library bytes", m["library_bytes"], flush=True)


def time_ab(out: Path, rounds: int, calls: int) -> None:
    import slimc

    models = {fmt: slimc.load(out / fmt, threads=1) for fmt in FORMATS}
    feeds = {fmt: list(m.example_inputs().values()) for fmt, m in models.items()}
    for fmt, m in models.items():  # warm up
        for _ in range(20):
            m.run_arrays(feeds[fmt])
    per_call: dict[str, list[float]] = {fmt: [] for fmt in FORMATS}
    for r in range(rounds):
        order = FORMATS if r % 2 == 0 else FORMATS[::-1]
        for fmt in order:
            start = time.perf_counter()
            for _ in range(calls):
                models[fmt].run_arrays(feeds[fmt])
            per_call[fmt].append((time.perf_counter() - start) / calls * 1e3)
    medians = {fmt: statistics.median(v) for fmt, v in per_call.items()}
    ratios = [q / f for q, f in zip(per_call["int4-g32-qs"], per_call["int4-g32-fz"],
                                    strict=True)]
    summary = {"median_ms": medians, "ratio_qs_over_fz_median": statistics.median(ratios),
               "ratios_per_round": ratios, "rounds": rounds, "calls": calls}
    print(json.dumps(summary, indent=1))
    (out / "ab.json").write_text(json.dumps(summary, indent=1))


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("build", "time"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/qs_ab"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=100)
    args = ap.parse_args()
    if args.mode == "build":
        build(args.out)
    else:
        time_ab(args.out, args.rounds, args.calls)


if __name__ == "__main__":
    main()
