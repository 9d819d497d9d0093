"""``slimc analyze`` as a Python API: what each layer costs on a target and how fragile it is.

Captures the model with the shape of the calibration batches, runs the ``cost`` analysis and the
requested sensitivity criteria through an :class:`~slimc.passmanager.AnalysisManager`, and
writes into the output directory (each file atomically):

* ``analysis.json``: every number (per node, per layer, per op type, per criterion and setting);
* ``report.md``: the most sensitive and most expensive layers and what to compress first;
* ``sensitivity_vs_cost.png`` and ``latency_by_op.png``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimc.errors import UsageError
from slimc.passmanager import AnalysisManager, PassContext, PassManager

ALL_CRITERIA = ("magnitude", "activation", "taylor", "hessian", "perturbation")
PERTURBATION_MODES = ("disagree", "all")
PLOTS = ("sensitivity_vs_cost.png", "latency_by_op.png")


#: Kept for callers: PassContext itself carries the calibration batches now.
AnalysisContext = PassContext


@dataclass
class AnalyzeOptions:
    target: str = "llvm"
    #: Entry of backends/hardware.toml; default: the target's device.
    hardware: str | None = None
    calib: str | Path | None = None
    output: str | Path | None = None
    criteria: Sequence[str] = ALL_CRITERIA
    bits: tuple[int, ...] = (8, 4, 3, 2)
    keep_ratios: tuple[float, ...] = (0.75, 0.5)
    rank_ratios: tuple[float, ...] = (0.5, 0.25)
    #: Setting whose damage ranks layers (must be one of the settings above).
    reference: str = "q4"
    batch_size: int = 4
    max_batches: int = 2
    #: Sequence length of text inputs (None: the loader's default).
    seq_len: int | None = 128
    inputs: Sequence[str] = ()
    #: Build and time per-op TVM kernels on the target; measured times replace the roofline.
    measure: bool = False
    #: ``HOST:PORT`` of a TVM RPC server on the device (needed to measure a cross target).
    rpc: str | None = None
    #: Runtime threads for local kernel timing (default ``TVM_NUM_THREADS`` or all cores).
    threads: int | None = None
    #: Cores the analysis itself uses (``-j``, :mod:`slimc.jobs`); None: every core.
    jobs: int | None = None
    #: Layers the perturbation criterion measures: ``disagree`` (where the cheap proxies rank
    #: them differently, plus anchors; the rest scaled from taylor) or ``all``.
    perturbation: str = "disagree"


@dataclass
class AnalyzeResult:
    output: Path
    analysis: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    #: The captured IR the numbers refer to (for further analysis in Python).
    ir: Any = None


def analyze_model(model: str, options: AnalyzeOptions | None = None, *,
                  stage: Callable[[str], None] = lambda name: None) -> AnalyzeResult:
    """Analyse ``model`` and write analysis.json, report.md and plots; see the module doc."""
    from slimc.jobs import compile_jobs

    options = options or AnalyzeOptions()
    timings: dict[str, float] = {}
    cpu_timings: dict[str, float] = {}
    marks: list[tuple[str, float, float]] = []

    def timed_stage(name: str) -> None:  # each stage's wall and CPU seconds, for analysis.json
        now, cpu = time.perf_counter(), time.process_time()
        if marks:
            timings[marks[-1][0]] = round(now - marks[-1][1], 3)
            cpu_timings[marks[-1][0]] = round(cpu - marks[-1][2], 3)
        marks.append((name, now, cpu))
        stage(name)

    with compile_jobs(options.jobs):
        return _analyze(model, options, timed_stage, timings, cpu_timings)


def _analyze(model: str, options: AnalyzeOptions, stage: Callable[[str], None],
             timings: dict[str, float], cpu_timings: dict[str, float]) -> AnalyzeResult:
    from slimc.calibration import load_calibration
    from slimc.capture import capture, load_model
    from slimc.loaders.base import parse_overrides
    from slimc.passes.analysis.hardware import get_hardware, hardware_for_target
    from slimc.passes.analysis.sensitivity import criterion_pass
    from slimc.plugins import get_registry
    from slimc.targets import resolve_target

    _validate_settings(options)
    registry = get_registry()
    criteria = [criterion_pass(c, registry.passes).criterion for c in options.criteria]
    spec = resolve_target(options.target, registry)
    hardware = get_hardware(options.hardware) if options.hardware else hardware_for_target(spec)
    if options.calib is not None and not Path(options.calib).exists():
        raise UsageError(f"Calibration data {str(options.calib)!r} does not exist.",
                         hint="Give --calib a text file, a .npy/.npz file or a folder of images.")
    started = time.perf_counter()
    stage("load")
    # Sensitivity and cost are measured at one length: the calibration batches' (the default
    # dynamic sequence would give a graph whose costs read as its example length anyway).
    loaded = load_model(model, parse_overrides(list(options.inputs)), registry,
                        default_sequence="fixed")
    if loaded.program is not None:  # a .pt2 is fixed to its exported shapes
        ir, values = capture(loaded)
        template, batch_size = dict(zip(ir.input_names, values, strict=True)), None
    else:
        template, batch_size = _trim_sequence(loaded.example_inputs, options.seq_len), \
            options.batch_size
    stage("calibration data")
    calib = load_calibration(options.calib, template, model_dir=loaded.extra.get("tokenizer"),
                             batch_size=batch_size, max_batches=options.max_batches,
                             vocab_size=_vocab_size(loaded))
    stage("capture")
    if loaded.program is None:
        loaded.example_inputs = calib.batches[0]
        ir, _ = capture(loaded)
    batches = [[b[name] for name in ir.input_names] for b in calib.batches]
    ctx = AnalysisContext(target=spec, example_inputs=batches[0], calibration_batches=batches)
    ctx.analyses = AnalysisManager(ir, ctx, PassManager(registry.passes).lookup)
    stage("cost (building and timing kernels)" if options.measure else "cost")
    cost = ctx.analyses.get("cost", hardware=None if options.measure and not options.hardware
                            else hardware.name, measure=options.measure, rpc=options.rpc,
                            threads=options.threads)
    sensitivity = {}
    for criterion in criteria:
        stage(f"sensitivity ({criterion})")
        sensitivity[criterion] = ctx.analyses.get(
            "sensitivity", criterion=criterion, bits=tuple(options.bits),
            keep_ratios=tuple(options.keep_ratios), rank_ratios=tuple(options.rank_ratios),
            reference=options.reference, max_batches=options.max_batches,
            **({"select": options.perturbation} if criterion == "perturbation" else {}))
    analysis = _assemble(ir, loaded, spec, cost, sensitivity, calib)
    stage("write")
    analysis["seconds"] = round(time.perf_counter() - started, 2)
    #: Wall seconds per stage (``load``, ``capture``, ``cost``, ``sensitivity (NAME)``...).
    analysis["timings"] = dict(timings)
    #: CPU seconds (all threads of this process) per stage: on a shared host the wall
    #: seconds above measure the load as much as the analysis.
    analysis["cpu_timings"] = dict(cpu_timings)
    out = Path(options.output or f"{loaded.name}.analysis")
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "analysis.json", json.dumps(analysis, indent=1, default=_json_default))
    _write_atomic(out / "report.md", render_markdown(analysis))
    _plot_sensitivity_vs_cost(analysis, out / PLOTS[0])
    _plot_latency_by_op(analysis, out / PLOTS[1])
    return AnalyzeResult(out, analysis, list(calib.warnings), ir)


def _validate_settings(options: AnalyzeOptions) -> None:
    """Ratios are fractions of what is kept, bits a small integer: say so before any work."""
    for label, values in (("--keep-ratios", options.keep_ratios),
                          ("--rank-ratios", options.rank_ratios)):
        bad = [v for v in values if not 0.0 < float(v) <= 1.0]
        if bad:
            raise UsageError(f"{label} {', '.join(map(str, bad))}: a ratio is the fraction "
                             "kept, between 0 (exclusive) and 1.",
                             hint=f"For example {label} 0.75,0.5.")
    bad_bits = [b for b in options.bits if not 1 <= int(b) <= 16]
    if bad_bits:
        raise UsageError(f"--bits {', '.join(map(str, bad_bits))}: weight bit widths are "
                         "whole numbers from 1 to 16.", hint="For example --bits 8,4.")
    if options.perturbation not in PERTURBATION_MODES:
        raise UsageError(f"--perturbation {options.perturbation!r}: measure the layers the "
                         "cheap criteria disagree on (disagree) or every layer (all).",
                         hint="Use --perturbation disagree or --perturbation all.")
    if options.seq_len is not None and options.seq_len < 1:
        raise UsageError("--seq-len must be at least 1.")


def _trim_sequence(inputs: dict[str, torch.Tensor], seq_len: int | None):
    """Text inputs (2-D integer tensors) cut to ``seq_len`` tokens: analysis cost is linear in
    it and 128 tokens rank layers as well as the model's maximum."""
    if seq_len is None:
        return dict(inputs)
    return {k: v[:, :seq_len] if v.dim() == 2 and not v.is_floating_point() else v
            for k, v in inputs.items()}


def _vocab_size(loaded) -> int | None:
    config = getattr(loaded.module, "config", None)
    return getattr(config, "vocab_size", None) if config is not None else None


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- assembling the per-layer table --------------------------------------------------------------


def primary_criterion(analysis: dict[str, Any]) -> str | None:
    """The criterion rankings use: measured perturbation when it ran, else the last one."""
    names = list(analysis["sensitivity"])
    return "perturbation" if "perturbation" in names else (names[-1] if names else None)


def _spearman(a: list[float], b: list[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return None
    value = spearmanr(a, b).statistic
    return None if value != value else round(float(value), 4)  # NaN for constant inputs


def _assemble(ir, loaded, spec, cost, sensitivity, calib) -> dict[str, Any]:
    layers: dict[str, dict[str, Any]] = {}
    for name, entry in cost.by_layer.items():
        layers[name] = {**entry, "sensitivity": {}}
    for criterion, result in sensitivity.items():
        for name, layer in result.layers.items():
            row = layers.setdefault(name, {"sensitivity": {}})
            row.update(kind=layer.kind, module_type=layer.module_type)
            row["sensitivity"][criterion] = layer.curve[result.reference]
    names = list(layers)
    agreement = {a: {b: _spearman([layers[n]["sensitivity"][a] for n in names],
                                  [layers[n]["sensitivity"][b] for n in names])
                     for b in sensitivity} for a in sensitivity}
    groups: dict[str, dict[str, Any]] = {}
    for criterion, result in sensitivity.items():
        for name, g in result.groups.items():
            row = groups.setdefault(name, {"kind": g.kind, "module_path": g.module_path,
                                           "units": g.units, "unit_width": g.unit_width,
                                           "params": g.params, "removed": g.removed,
                                           "sensitivity": {}})
            row["sensitivity"][criterion] = g.curve
    analysis = {
        "model": {"name": loaded.name, "source": loaded.source, "params": ir.num_params(),
                  "inputs": [s.to_json() for s in ir.input_specs()],
                  "outputs": [s.to_json() for s in ir.output_specs()]},
        "target": spec.to_json(), "calibration": calib.to_json(),
        "cost": cost.to_json(),
        "sensitivity": {c: r.to_json() for c, r in sensitivity.items()},
        "criteria_rank_correlation": agreement,
        "layers": layers,
        "groups": groups,
    }
    analysis["compress_first"] = compress_first(analysis)
    return analysis


def compress_first(analysis: dict[str, Any], top: int = 8) -> list[dict[str, Any]]:
    """Layers ordered by benefit over harm: share of weight bytes and latency, discounted by
    how sensitive the layer is among all layers (its percentile under the primary criterion)."""
    criterion = primary_criterion(analysis)
    layers = analysis["layers"]
    if criterion is None or not layers:
        return []
    order = sorted(layers, key=lambda n: layers[n]["sensitivity"].get(criterion, 0.0))
    percentile = {n: i / max(len(order) - 1, 1) for i, n in enumerate(order)}
    total_bytes = sum(r.get("weight_bytes", 0) for r in layers.values()) or 1
    rows = []
    for name, row in layers.items():
        share = 0.5 * row.get("latency_share", 0.0) + 0.5 * row.get("weight_bytes", 0) / total_bytes
        rows.append({"layer": name, "priority": share * (1.0 - percentile[name]),
                     "latency_share": row.get("latency_share", 0.0),
                     "weight_bytes": row.get("weight_bytes", 0),
                     "sensitivity_percentile": round(percentile[name], 3),
                     "sensitivity": row["sensitivity"].get(criterion)})
    return sorted(rows, key=lambda r: -r["priority"])[:top]


# -- report.md ---------------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def render_markdown(analysis: dict[str, Any], top: int = 10) -> str:
    """The human summary of ``analysis``: costs, fragile layers, where to start compressing."""
    cost, hw = analysis["cost"], analysis["cost"]["hardware"]
    layers = analysis["layers"]
    criterion = primary_criterion(analysis)
    total = cost["total"]
    lines = [f"# Analysis of {analysis['model']['name']}", "",
             f"Target **{analysis['target']['name']}** on hardware **{hw['name']}** "
             f"({hw['description']}).", "",
             f"- parameters: {analysis['model']['params']:,}; weight bytes: "
             f"{total['weight_bytes'] / 2**20:.1f} MiB",
             f"- MACs: {total['macs']:.3g}; FLOPs: {total['flops']:.3g}; activation bytes: "
             f"{total['activation_bytes'] / 2**20:.1f} MiB",
             f"- roofline latency estimate: {total.get('roofline_s', total['latency_s']) * 1e3:.3f}"
             " ms",
             f"- calibration: {analysis['calibration']['source']} "
             f"({analysis['calibration']['batches']} batches of "
             f"{analysis['calibration']['batch_shapes']})", ""]
    measured = cost.get("measured")
    if measured:
        lines[-1:-1] = [
            f"- measured on the target: {measured['measured_nodes']} op nodes "
            f"({measured['kernels']} distinct kernels: {measured['built']} built and timed now, "
            f"{measured['reused']} from the cache `{measured['table']}`"
            + (f", {len(measured['failed'])} failed" if measured["failed"] else "")
            + f"); latency with measurements where available: {total['latency_s'] * 1e3:.3f} ms "
            "(isolated kernels: pointwise ops that fuse in the compiled model are over-counted)"]
    if analysis["calibration"]["synthetic"]:
        lines += ["> Calibration used synthetic inputs: data-aware rankings are less reliable.",
                  ""]
    basis = "measured where available" if measured else "roofline"
    lines += [f"## Most expensive layers (latency: {basis})", "",
              "| layer | latency ms | roofline ms | share | MACs | weight MiB |",
              "|---|---|---|---|---|---|"]
    for name in sorted(layers, key=lambda n: -layers[n].get("latency_s", 0))[:top]:
        r = layers[name]
        lines.append(f"| {name} | {r.get('latency_s', 0) * 1e3:.4f} | "
                     f"{r.get('roofline_s', 0) * 1e3:.4f} | "
                     f"{r.get('latency_share', 0):.1%} | {r.get('macs', 0):.3g} | "
                     f"{r.get('weight_bytes', 0) / 2**20:.2f} |")
    if criterion:
        ref = analysis["sensitivity"][criterion]["reference"]
        lines += ["", f"## Most sensitive layers ({criterion}, setting {ref})", ""]
        measured = [row["extra"].get("measured", 1.0) for row in
                    analysis["sensitivity"][criterion]["layers"].values()]
        if measured and min(measured) < 1.0:
            lines += [f"Perturbation measured {int(sum(measured))} of {len(measured)} layers "
                      "(where magnitude, taylor and hessian rank them differently, and anchors "
                      "along their common ranking); the others are taylor's estimate scaled to "
                      "the measurements (`--perturbation all` measures every layer).", ""]
        lines += ["| layer | " + " | ".join(analysis["sensitivity"]) + " |",
                  "|---|" + "---|" * len(analysis["sensitivity"])]
        for name in sorted(layers, key=lambda n: -layers[n]["sensitivity"].get(criterion, 0))[
                :top]:
            lines.append(f"| {name} | " + " | ".join(
                _fmt(layers[name]["sensitivity"].get(c)) for c in analysis["sensitivity"]) + " |")
        lines += ["", "## Compress first", "",
                  "Large share of latency and weight bytes, low sensitivity:", ""]
        for i, row in enumerate(analysis["compress_first"], 1):
            lines.append(f"{i}. `{row['layer']}`: {row['latency_share']:.1%} of latency, "
                         f"{row['weight_bytes'] / 2**20:.2f} MiB, less sensitive than "
                         f"{1 - row['sensitivity_percentile']:.0%} of layers")
        lines += ["", "## Do the criteria agree? (Spearman rank correlation over layers)", "",
                  "| | " + " | ".join(analysis["sensitivity"]) + " |",
                  "|---|" + "---|" * len(analysis["sensitivity"])]
        for a, row in analysis["criteria_rank_correlation"].items():
            lines.append(f"| {a} | " + " | ".join(_fmt(v) for v in row.values()) + " |")
    lines += group_lines(analysis, criterion, top)
    lines += ["", "## Latency by op type", "", "| op | nodes | latency ms |", "|---|---|---|"]
    for op, r in list(cost["by_op"].items())[:top]:
        lines.append(f"| {op} | {r['nodes']} | {r['latency_s'] * 1e3:.4f} |")
    lines += ["", f"Plots: {', '.join(PLOTS)}. Every number: analysis.json.", ""]
    return "\n".join(lines)


def group_table(analysis: dict[str, Any], criterion: str | None, top: int = 10
                ) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the prunable groups, least damaged at the middle keep ratio first."""
    groups = analysis.get("groups") or {}
    if not criterion or not groups:
        return [], []
    keys = sorted({k for g in groups.values() for k in g["sensitivity"].get(criterion, {})
                   if k != "keep0"}, key=lambda k: -float(k.removeprefix("keep")))
    mid = keys[len(keys) // 2] if keys else "keep0"

    def damage(g):
        curve = g["sensitivity"].get(criterion, {})
        return curve.get(mid, curve.get("keep0", 0.0))

    header = ["group", "kind", "units", "params", *keys, "drop block"]
    rows = []
    for name, g in sorted(groups.items(), key=lambda kv: damage(kv[1]))[:top]:
        curve = g["sensitivity"].get(criterion, {})
        rows.append([name, g["kind"], str(g["units"]), f"{g['params']:,}",
                     *(_fmt(curve.get(k)) for k in keys), _fmt(curve.get("keep0"))])
    return header, rows


def group_lines(analysis: dict[str, Any], criterion: str | None, top: int = 10) -> list[str]:
    header, rows = group_table(analysis, criterion, top)
    if not rows:
        return []
    total = len(analysis["groups"])
    lines = ["", f"## Prunable groups ({criterion}: output damage when keeping a fraction of "
             "the units, lowest-magnitude removed first; least damaged first)", "",
             f"{total} groups/blocks from the prune-groups analysis; every curve in "
             "analysis.json (`groups`).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# -- plots -------------------------------------------------------------------------------------


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _plot_sensitivity_vs_cost(analysis: dict[str, Any], path: Path) -> None:
    plt = _figure()
    criterion = primary_criterion(analysis)
    layers = analysis["layers"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    if criterion:
        ref = analysis["sensitivity"][criterion]["reference"]
        top = max((r["sensitivity"][criterion] for r in layers.values()), default=0.0)
        # Layers that do not reach the analysed output (e.g. a pooler) would squash the axis.
        shown = {n: r for n, r in layers.items() if r["sensitivity"][criterion] > 1e-9 * top}
        biggest = max((r["weight_bytes"] for r in shown.values()), default=1) or 1
        for kind, color in (("linear", "tab:blue"), ("conv", "tab:green"),
                            ("embedding", "tab:orange")):
            names = [n for n, r in shown.items() if r.get("kind") == kind]
            if names:
                ax.scatter([shown[n]["latency_s"] * 1e3 for n in names],
                           [shown[n]["sensitivity"][criterion] for n in names],
                           s=[12 + 60 * shown[n]["weight_bytes"] / biggest for n in names],
                           c=color, alpha=0.7, label=kind)
        label = sorted(shown, key=lambda n: -shown[n]["sensitivity"][criterion])[:4]
        label += sorted(shown, key=lambda n: -shown[n]["latency_s"])[:3]
        for i, n in enumerate(dict.fromkeys(label)):
            point = (shown[n]["latency_s"] * 1e3, shown[n]["sensitivity"][criterion])
            ax.annotate(_short(n), point,
                        fontsize=7, xytext=(4, 10 - 9 * i), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"})
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_ylabel(f"sensitivity: {criterion} at {ref} (log)")
        ax.legend(title="layer kind (size: weight bytes)", fontsize=8, loc="best")
        if len(shown) < len(layers):
            ax.text(0.01, 0.01, f"{len(layers) - len(shown)} layer(s) with no effect on the "
                    "output not shown", transform=ax.transAxes, fontsize=7)
    ax.set_xlabel(f"roofline latency on {analysis['cost']['hardware']['name']} (ms, log)")
    ax.set_title(f"{analysis['model']['name']}: per-layer sensitivity vs cost\n"
                 "bottom right = cheap to compress, expensive to run")
    ax.grid(True, which="both", alpha=0.25)
    _save_figure(fig, path)
    plt.close(fig)


def _plot_latency_by_op(analysis: dict[str, Any], path: Path, top: int = 12) -> None:
    plt = _figure()
    by_op = list(analysis["cost"]["by_op"].items())
    shown = by_op[:top]
    rest = sum(r["latency_s"] for _, r in by_op[top:])
    labels = [op for op, _ in shown] + (["(other)"] if rest else [])
    values = [r["latency_s"] * 1e3 for _, r in shown] + ([rest * 1e3] if rest else [])
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1.5))
    ax.barh(labels[::-1], values[::-1], color="tab:blue")
    total = analysis["cost"]["total"]["latency_s"] * 1e3
    for i, v in enumerate(values[::-1]):
        ax.text(v, i, f" {v:.3g} ms ({v / total:.0%})", va="center", fontsize=8)
    ax.set_xlabel("roofline latency (ms)")
    ax.set_xlim(0, max(values) * 1.3 if values else 1)
    ax.set_title(f"{analysis['model']['name']} on {analysis['cost']['hardware']['name']}: "
                 f"latency by op type (total {total:.3g} ms)")
    _save_figure(fig, path)
    plt.close(fig)


def _short(name: str) -> str:
    """``encoder.layer.3.attention.self.query`` -> ``layer.3.attention.self.query``."""
    parts = name.split(".")
    return ".".join(parts[-4:]) if len(parts) > 4 else name
