"""Decode-step latency of fp32 / int8 / int4 artifacts, measured side by side (issue 5).

    python benchmarks/quantize_latency.py            # THREADS=2 by default
    REUSE=1 THREADS=1 python benchmarks/quantize_latency.py   # time the artifacts already built

A Llama-shaped model with ~125M parameters (random weights: latency does not depend on them),
batch 1, one token: every weight is read once per step, so the step is memory-bound and should
speed up toward the weight-byte ratio. Each artifact is built and verified by
``slimc.compile_model``; the timings interleave the three libraries round by round so that
machine noise hits them alike.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimc.backends.tvm.runtime import NativeRunner  # noqa: E402

import slimc  # noqa: E402

THREADS = int(os.environ.get("THREADS", "2"))
OUT = Path(os.environ.get("OUT_DIR", "/tmp/slimc-quantize-latency"))


def decode_llama():
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                           num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                           max_position_embeddings=256)
    model = T.LlamaForCausalLM(config).eval()
    model.config.use_cache = False
    return model, {"input_ids": torch.tensor([[42]])}


SETTINGS = {"fp32": "eliminate-dead-code", "int8": "quantize{weights=int8}",
            "int4": "quantize{weights=int4,group_size=128}",
            # the previous int4 kernel (dequantize per k inside the loop), for comparison
            "int4 per-k kernel": "quantize{weights=int4,group_size=128}"}


def main() -> None:
    factory = f"{Path(__file__).resolve()}:decode_llama"
    runners, rows = {}, {}
    from slimc.backends.tvm import quantized_ops

    for name, pipeline in SETTINGS.items():
        quantized_ops.FACTORED_INT4 = "per-k" not in name
        quantized_ops.linear_kernel.cache_clear()
        t0 = time.perf_counter()
        if os.environ.get("REUSE"):
            m = json.loads((OUT / name.replace(" ", "_") / "manifest.json").read_text())
        else:
            m = slimc.compile_model(factory, slimc.CompileOptions(
                pipeline=pipeline, output=OUT / name.replace(" ", "_"), threads=THREADS)).manifest
        rows[name] = {"weight_bytes": m["weight_bytes_after"], "library_bytes": m["library_bytes"],
                      "params": m["params_before"], "compile_s": round(time.perf_counter() - t0),
                      "verified_rel_l2": m["verification"]["relative_l2_vs_ir"]}
        runners[name] = NativeRunner(OUT / name.replace(" ", "_") / "model.so", threads=THREADS)
        print(name, rows[name], flush=True)
    inputs = [np.array([[42]], dtype=np.int64)]
    times: dict[str, list[float]] = {n: [] for n in runners}
    for _ in range(3):
        for r in runners.values():
            r(inputs)
    for _ in range(int(os.environ.get("ROUNDS", "20"))):
        for name, r in runners.items():
            t0 = time.perf_counter()
            r(inputs)
            times[name].append(time.perf_counter() - t0)
    for name in runners:
        rows[name]["median_ms"] = round(1e3 * statistics.median(times[name]), 2)
        rows[name]["time_vs_fp32"] = round(
            statistics.median(times[name]) / statistics.median(times["fp32"]), 3)
        rows[name]["speedup_vs_fp32"] = round(
            statistics.median(times["fp32"]) / statistics.median(times[name]), 2)
        rows[name]["byte_ratio_vs_fp32"] = round(
            rows["fp32"]["library_bytes"] / rows[name]["library_bytes"], 2)
    print(json.dumps(rows, indent=1))
    for row in rows.values():
        row["threads"] = THREADS
    suffix = f"_{THREADS}t" if os.environ.get("REUSE") else ""
    out = Path(__file__).resolve().parent / "results" / f"quantize_latency{suffix}.json"
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
