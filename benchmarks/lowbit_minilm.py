"""all-MiniLM-L6-v2 (WordSim-353 Spearman) with uniform int3/int2 weights, RTN and GPTQ: what
the low-bit formats alone keep at sizes near 0.10-0.11 of fp32.

Same data and scoring as ``benchmarks/budget_minilm.py`` (32x8 token batches, KJV Genesis 1-3
as calibration, Spearman on the compressed IR).

    .venv/bin/python benchmarks/lowbit_minilm.py   # -> benchmarks/results/lowbit_minilm.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.budget_minilm import INPUTS, MODEL, data  # noqa: E402
from benchmarks.prune_common import write_json  # noqa: E402

ROWS = [
    "quantize{weights=int4,group_size=128}",
    "quantize{weights=int3,group_size=64}",
    "quantize{weights=int3,group_size=64,method=gptq}",
    "quantize{weights=int3,group_size=128,method=gptq}",
    "quantize{weights=int2,group_size=64,method=gptq}",
    "quantize{weights=int3,group_size=128,method=gptq,"
    "layers=transformer.embeddings.word_embeddings=int2-g64}",
]


def main() -> None:
    from slimc.api import CompileOptions
    from slimc.calibration import load_calibration
    from slimc.capture import capture, load_model
    from slimc.compiler import _prepare_task
    from slimc.loaders.base import parse_overrides
    from slimc.passmanager import AnalysisManager, PassContext, PassManager
    from slimc.pipeline import parse_pipeline_text, validate
    from slimc.plugins import get_registry
    from slimc.search.search import task_scorer
    from slimc.targets import resolve_target

    pairs, calib_file = data(Path("/tmp/budget_bench"))
    registry = get_registry()
    ir, example = capture(load_model(MODEL, parse_overrides(INPUTS), registry))
    calibration = load_calibration(calib_file, dict(zip(ir.input_names, example, strict=True)),
                                   model_dir=ir.annotations["source"]["tokenizer"],
                                   max_batches=1)
    task = _prepare_task(CompileOptions(eval_data=pairs, calib=calib_file), ir, example,
                         registry, calibration, [], lambda s: None, searching=True)
    scorer = task_scorer(task)
    rows = [{"pipeline": "fp32", "size": 1.0, "spearman": scorer.original}]
    print(f"fp32 Spearman {scorer.original:.4f}", flush=True)
    for text in ROWS:
        t0 = time.perf_counter()
        clone = ir.clone()
        ctx = PassContext(target=resolve_target("llvm", registry), example_inputs=example,
                          verify=False)
        ctx.calibration_batches = [[b[n] for n in ir.input_names] for b in calibration.batches]
        ctx.analyses = AnalysisManager(clone, ctx, PassManager(registry.passes).lookup)
        PassManager(registry.passes).run(clone, validate(parse_pipeline_text(text),
                                                         registry.passes), ctx)
        value = scorer.score(clone)
        row = {"pipeline": text, "size": clone.weight_bytes() / ir.weight_bytes(),
               "spearman": value, "of_fp32": value / scorer.original,
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"| `{text}` | {row['size']:.4f} | {value:.4f} | {row['of_fp32']:.1%} |",
              flush=True)
    write_json("lowbit_minilm", {"rows": rows})


if __name__ == "__main__":
    main()
