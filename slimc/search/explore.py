"""``slimc explore``: the Pareto front of task quality against size and against latency.

Every point is a candidate the budget search built and measured (:mod:`.search`), swept over
size and latency budgets and the pruning ratios the techniques allow; each carries the recipe
that reproduces it with ``slimc compile MODEL --recipe``. Nothing is lowered or built with TVM:
quality is measured on the compressed IR (what the artifact computes, within the verification
tolerance), latency is the target's cost model.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimc.errors import UsageError

DEFAULT_SIZES = (0.5, 0.35, 0.25, 0.18, 0.13, 0.1)
DEFAULT_LATENCIES = (0.9, 0.75, 0.6, 0.5)


@dataclass
class ExploreOptions:
    target: str = "llvm"
    inputs: Sequence[str] = ()
    output: str | Path | None = None
    calib: str | Path | None = None
    calib_batches: int = 8
    eval_data: str | Path | None = None
    eval_kind: str | None = None
    eval_batches: int = 16
    sizes: Sequence[float] = DEFAULT_SIZES
    latencies: Sequence[float] = DEFAULT_LATENCIES
    techniques: str = "all"
    trust_remote_code: bool = False


def pareto(points: list[dict[str, Any]], cost: str, higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both ``cost`` (lower) and quality."""
    def quality(p: dict[str, Any]) -> float:
        return p["value"] if higher_is_better else -p["value"]

    front = []
    for i, p in enumerate(points):
        if cost not in p["relative"]:
            continue
        dominated = any(
            q["relative"].get(cost, float("inf")) <= p["relative"][cost]
            and quality(q) >= quality(p)
            and (q["relative"][cost] < p["relative"][cost] or quality(q) > quality(p))
            for j, q in enumerate(points) if j != i and cost in q["relative"])
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i]["relative"][cost])


def explore_model(model: str, options: ExploreOptions, stage: Callable[[str], None] =
                  lambda s: None, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Sweep budgets, write ``explore.json``, ``pareto.png`` and ``recipes/``; returns the JSON."""
    import torch

    from slimc.api import CompileOptions, safe_name
    from slimc.capture import capture, load_model
    from slimc.compiler import _prepare_task
    from slimc.loaders.base import parse_overrides
    from slimc.passes.analysis.hardware import hardware_if_known
    from slimc.passmanager import AnalysisManager, PassContext, PassManager
    from slimc.plugins import get_registry
    from slimc.targets import resolve_target

    from .driver import _fastest_torch_threads
    from .search import Search, describe_hardware, proxy_scorer, task_scorer
    from .solver import Infeasible
    from .space import Techniques

    for value in (*options.sizes, *options.latencies):
        if not 0 < value <= 1:
            raise UsageError(f"explore budget {value:g} is not a share of the original in "
                             "(0, 1].", hint="e.g. --sizes 0.5,0.25,0.1")
    if options.output is not None:  # before the minutes of capture and search
        from slimc.outdir import check_can_create

        check_can_create(Path(options.output))
    registry = get_registry()
    spec = resolve_target(options.target, registry)
    warnings: list[str] = []
    stage("capture")
    # costs and damage are measured at one length, as in `slimc analyze`
    loaded = load_model(model, parse_overrides(list(options.inputs)), registry,
                        trust_remote_code=options.trust_remote_code, default_sequence="fixed")
    ir, example = capture(loaded)
    output = Path(options.output or f"{safe_name(ir.name)}.explore")
    ctx = PassContext(target=spec, example_inputs=example, threads=torch.get_num_threads(),
                      log=log)
    calibration = None
    if options.calib:
        from slimc.calibration import load_calibration, spread_for

        calibration = load_calibration(
            options.calib, dict(zip(ir.input_names, example, strict=True)),
            model_dir=ir.annotations.get("source", {}).get("tokenizer"),
            max_batches=options.calib_batches,
            spread=spread_for(options.calib, options.eval_data))
        ctx.calibration_batches = [[b[n] for n in ir.input_names] for b in calibration.batches]
    compile_like = CompileOptions(eval_data=options.eval_data, eval_kind=options.eval_kind,
                                  eval_batches=options.eval_batches, calib=options.calib)
    task = _prepare_task(compile_like, ir, example, registry, calibration, warnings, stage,
                         searching=True)
    ctx.analyses = AnalysisManager(ir, ctx, PassManager(registry.passes).lookup)
    stage("measure every layer's choices and sweep the budgets")
    with _fastest_torch_threads(ir, ctx.calibration(1)[0]):
        scorer = task_scorer(task) if task is not None else proxy_scorer(ir, ctx)
        search = Search(ir, ctx, registry, Techniques.for_context(options.techniques, ctx),
                        scorer, hardware_if_known(ctx.target), log)
        sweeps = [{"size": s} for s in options.sizes]
        if "latency" in search.original:
            sweeps += [{"latency": v} for v in options.latencies]
        for ratio in search.techniques.prune_ratios:
            base = search.base(ratio)
            for limits in sweeps:
                try:
                    search.build(base, search.solve(base, limits))
                except Infeasible as exc:
                    log(f"explore: {limits} at prune ratio {ratio:g}: {exc}")
        # uniform W8A8 (with --calib, on a target with int8 dot products) as one more point:
        # no per-layer choice of the sweeps, the only format that lowers compute-bound latency
        search.w8a8_candidate(search.base(0.0), {}, keep=False)
        # weights already on a format's grid (a dequantized GGUF): the lossless point, exact
        # formats there and fp32 elsewhere; nothing is built when no layer is exact
        search.lossless({}, None, keep=False)
    points = _points(search, spec.name, options, model)
    result = {
        "model": model, "target": spec.name,
        "metric": {"kind": scorer.kind, "label": scorer.label, "original": scorer.original,
                   "higher_is_better": scorer.higher_is_better},
        "hardware": describe_hardware(search.base(0.0).space, *search.int8_note())
        if 0.0 in search.techniques.prune_ratios else None,
        "points": points,
        "pareto": {cost: pareto(points, cost, scorer.higher_is_better)
                   for cost in ("size", "latency")},
        "warnings": warnings,
    }
    _write(output, result, points)
    result["output"] = str(output.resolve())
    return result


def _points(search, target: str, options: ExploreOptions, model: str) -> list[dict[str, Any]]:
    """One point per distinct measured pipeline, the original model first."""
    from .driver import recipe_data

    points = [{"pipeline": "(original, -O0)", "items": [],
               "relative": {k: 1.0 for k in search.original}, "value": search.scorer.original,
               "drop": 0.0}]
    seen = set()
    for cand in search.measured:
        s = cand.summary()
        if s["pipeline"] in seen:
            continue
        seen.add(s["pipeline"])
        points.append({**s, "items": cand.items})
    for i, p in enumerate(points):
        p["id"] = f"point-{i:02d}"
        p["recipe"] = recipe_data(p["items"], target, options.inputs,
                                  f"slimc explore point {p['id']}: {p['pipeline']}")
        p["recipe_file"] = f"recipes/{p['id']}.yaml"
        flags = ["--recipe", p["recipe_file"]]
        if options.calib:
            flags += ["--calib", str(options.calib)]
        p["command"] = shlex.join(["slimc", "compile", model, *flags])
        del p["items"]
    return points


def _write(output: Path, result: dict[str, Any], points: list[dict[str, Any]]) -> None:
    import yaml

    output.mkdir(parents=True, exist_ok=True)
    (output / "recipes").mkdir(exist_ok=True)
    for p in points:
        (output / p["recipe_file"]).write_text(yaml.safe_dump(p["recipe"], sort_keys=False,
                                                              width=100))
    (output / "explore.json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, output / "pareto.png")


def plot(result: dict[str, Any], path: Path) -> None:
    """Quality against size and against latency; the front joined, each point labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    costs = [c for c in ("size", "latency") if any(c in p["relative"] for p in points)]
    fig, axes = plt.subplots(1, len(costs), figsize=(6.5 * len(costs), 4.8), squeeze=False)
    metric = result["metric"]
    for ax, cost in zip(axes[0], costs, strict=True):
        xs = [p["relative"][cost] for p in points if cost in p["relative"]]
        ys = [p["value"] for p in points if cost in p["relative"]]
        ax.scatter(xs, ys, color="0.6", s=18, label="measured candidates")
        front = result["pareto"][cost]
        ax.plot([points[i]["relative"][cost] for i in front], [points[i]["value"] for i in front],
                "o-", color="tab:blue", label="Pareto front")
        for i in front:
            ax.annotate(points[i]["id"].removeprefix("point-"),
                        (points[i]["relative"][cost], points[i]["value"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel(f"{cost} relative to the original"
                      + (" (cost model)" if cost == "latency" else " (weight bytes)"))
        ax.set_ylabel(metric["label"] if metric["kind"] == "task" else "proxy drop (lower is "
                      "better)")
        ax.set_title(f"{result['model'].rstrip('/').split('/')[-1]} on {result['target']}: "
                     f"quality vs {cost}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
