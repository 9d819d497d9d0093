"""Cost-model latency of MiniLM fp32 / int8 weight-only / W8A8 IRs per target (issue 17).

    .venv/bin/python benchmarks/budget_w8a8_pricing.py  # results/budget_minilm_w8a8_pricing.json
"""
import json
import sys

sys.path.insert(0, ".")
from pathlib import Path

from slimc.passes.analysis.cost import estimate_costs, target_dot_product
from slimc.passes.analysis.hardware import hardware_for_target

from benchmarks.budget_minilm import INPUTS, MODEL, data
from slimc.calibration import load_calibration
from slimc.capture import capture, load_model
from slimc.loaders.base import parse_overrides
from slimc.passmanager import AnalysisManager, PassContext, PassManager
from slimc.pipeline import validate
from slimc.plugins import get_registry
from slimc.targets import resolve_target

_, calib = data(Path("/tmp/w17_budget"))
registry = get_registry()
ir, example = capture(load_model(MODEL, parse_overrides(INPUTS), registry))
cal = load_calibration(calib, dict(zip(ir.input_names, example, strict=True)),
                       model_dir=ir.annotations["source"]["tokenizer"], max_batches=1)
out = {}
built = {}
for name, items in (("int8 weight-only", [("quantize", {"weights": "int8"})]),
                    ("W8A8", [("quantize", {"weights": "int8", "activations": "int8"})])):
    c = ir.clone()
    ctx = PassContext(target=resolve_target("llvm", registry), example_inputs=example)
    ctx.calibration_batches = [[b[n] for n in ir.input_names] for b in cal.batches]
    m = PassManager(registry.passes)
    ctx.analyses = AnalysisManager(c, ctx, m.lookup)
    m.run(c, validate(items + [("eliminate-dead-code", {})], registry.passes), ctx)
    built[name] = c
for t in ("x86-64-v4-vnni", "x86", "arm-v8.2", "raspberry-pi-4"):
    spec = resolve_target(t, registry)
    ctx = PassContext(target=spec, example_inputs=example)
    ctx.analyses = AnalysisManager(ir, ctx, PassManager(registry.passes).lookup)
    dot = target_dot_product(ctx)
    hw = hardware_for_target(spec)
    fp32 = estimate_costs(ir, hw, dot_product=dot).total["latency_s"]
    out[t] = {"hardware": hw.name, "dot_product": dot, "fp32_ms": fp32 * 1e3,
              **{n: estimate_costs(c, hw, dot_product=dot).total["latency_s"] / fp32
                 for n, c in built.items()}}
    print(t, out[t], flush=True)
Path("benchmarks/results/budget_minilm_w8a8_pricing.json").write_text(json.dumps(out, indent=1))
