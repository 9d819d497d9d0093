"""Relative RTN weight error per matrix kind of SmolLM2, plain vs rotated (wt/smol21, issue 17).

Why rotation loses on a model dequantized from a Q4_1 GGUF: ``down_proj`` sits exactly on the
int4-g32 grid (error 0) and a rotation takes it off; the folded norm weights and the head's
``mix`` are new rounding error. Formats as recipe H4.

    .venv/bin/python benchmarks/smollm2_rotate_errors.py [--rotate hadamard]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.smollm2_rotate import rotate_llama  # noqa: E402
from passes.quantize.formats import fake_quantize, parse_format  # noqa: E402

FORMATS = {"down_proj": "int4-g32-fz", "gate_proj": "int3-g64", "up_proj": "int3-g64"}


def errors(model) -> dict[str, float]:
    """Mean relative Frobenius RTN error per kind of matrix (``table``: the tied table)."""
    out = collections.defaultdict(list)
    mats = [(n.split(".")[-1], m.weight.detach()) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    mats.append(("table", model.model.embed_tokens.weight.detach()))
    for kind, w in mats:
        q = fake_quantize(w, parse_format(FORMATS.get(kind, "int4-g128-fz")))
        out[kind].append(float((q - w).norm() / w.norm()))
    return {k: sum(v) / len(v) for k, v in out.items()}


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="/tmp/mem-bench/smollm2-135m")
    ap.add_argument("--rotate", default="hadamard", choices=("hadamard", "random"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir,
                                                              dtype=torch.float32).eval()
    plain = errors(model)
    rotate_llama(model, args.rotate)
    rotated = errors(model)
    for kind, err in plain.items():
        print(f"{kind:10s} plain {err:.4f}  rotated {rotated[kind]:.4f}")
    print(f"mix        rotated {rotated['mix']:.4f}")


if __name__ == "__main__":
    main()
