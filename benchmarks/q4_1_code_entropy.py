"""How many bits SmolLM2's Q4_1 codes really carry: can a lossless or codebook format reach
issue 17's `--budget size=0.13` (4.16 bits per weight) without re-rounding the weights?

The GGUF stores each linear as Q4_1: groups of 32 weights, 4-bit codes, an fp16 scale and
minimum per group (5 bits per weight). Below 4.25 bits every format slimc has re-rounds the
weights (int4-g128, int3) and loses 1.7x perplexity or more. This measures the empirical
entropy of the codes (single codes, pairs, quadruples) and how much of the weights a
fixed-length codebook of the most frequent tuples would cover: if the codes were concentrated,
a codebook or entropy-coded format could keep them exactly below 4 bits.

    python benchmarks/q4_1_code_entropy.py --blocks 0 10 20 29
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kquant_smollm2 import q4_1_parts  # noqa: E402
from benchmarks.prune_common import write_json  # noqa: E402
from benchmarks.prune_smollm2 import smollm2_path  # noqa: E402


def entropy_bits(symbols: np.ndarray, alphabet: int) -> float:
    p = np.bincount(symbols, minlength=alphabet) / symbols.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def tuples(codes: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(codes.size // n, dtype=np.int64)
    for i in range(n):
        out = out * 16 + codes[i::n][: out.size]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, nargs="*", default=[0, 10, 20, 29])
    ap.add_argument("--out", default="q4_1_code_entropy.json")
    args = ap.parse_args()
    from gguf import GGUFReader
    from gguf.quants import dequantize

    root, name = smollm2_path()
    reader = GGUFReader(root / name)
    parts = []
    for t in reader.tensors:
        if not t.name.startswith("blk.") or t.name.endswith("norm.weight"):
            continue
        if int(t.name.split(".")[1]) not in args.blocks:
            continue
        w = torch.from_numpy(np.ascontiguousarray(
            dequantize(t.data, t.tensor_type))).float().reshape(-1, int(t.shape[0]))
        codes, _, _, err = q4_1_parts(w)
        assert err < 1e-3, f"{t.name} is not on a Q4_1 grid (rebuild error {err})"
        parts.append(codes.reshape(-1).to(torch.uint8).numpy())
    codes = np.concatenate(parts)
    result = {"blocks": args.blocks, "weights": int(codes.size),
              "code_histogram": (np.bincount(codes, minlength=16) / codes.size).round(4).tolist(),
              "entropy_bits_per_weight": {}, "codebook_coverage": []}
    for n in (1, 2, 4):
        result["entropy_bits_per_weight"][f"{n}-tuples"] = round(
            entropy_bits(tuples(codes, n), 16 ** n) / n, 4)
    for n, size in ((2, 64), (2, 128), (4, 1024), (4, 2048), (4, 4096)):
        counts = np.sort(np.bincount(tuples(codes, n), minlength=16 ** n))[::-1]
        result["codebook_coverage"].append({
            "tuple": n, "entries": size, "index_bits_per_weight": np.log2(size) / n,
            "share_of_tuples_exact": round(float(counts[:size].sum() / counts.sum()), 4)})
    print(result)
    print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
