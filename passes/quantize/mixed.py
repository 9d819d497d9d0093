"""Mixed precision: choose each layer's format to minimise predicted damage under a byte budget.

Damage model: the output change when one layer alone is quantized, on calibration data, under
the same measure as the ``sensitivity`` analysis's ``perturbation`` criterion (KL divergence of
the softmax for logits, 1 - cosine for embeddings, relative L2 otherwise; see
:mod:`slimc.passes.analysis.criteria.divergence`), assumed additive across layers as in
HAWQ/HAQ-style allocation.

Where the damage comes from (:func:`damage_table`): the ``sensitivity`` analysis
(``criterion=perturbation, bits=(8,)``) through ``ctx.analyses``, so it is computed once and
cached with the other analyses. Its ``q8`` setting (symmetric per-output-channel RTN, 127 levels
a side) *is* slimc's int8 format for linear layers. It cannot express int4 with group sizes and
zero points, fp16/bf16, or an embedding table quantized per vocabulary row (it quantizes
embeddings per hidden column), so those entries are measured here, with the same batches and
measure, by running the graph with one weight substituted (the IR is never edited); those
measurements are memoised per :class:`PassContext` and weights, so a second ``quantize`` over
the same IR does not repeat them.

With a *proxy* criterion (``criterion=taylor|hessian|activation|magnitude``, for models where one
forward per layer and format is too slow) every entry comes from the analysis
(``bits=(8, 4)``): the layer's damage at the analysis's nearest setting (``q8`` for int8/fp16/bf16,
``q4`` for int4) scaled by how much larger the format's weight error is than that setting's,
both weighted by the layer's input second moments (the diagonal of ``X^T X``; unweighted for
embedding tables): ``d(f) = d(q) * e(f) / e(q)``. For int8 on linear layers the ratio is 1.

Solver: a multiple-choice knapsack solved by dynamic programming over the byte budget
discretised into ``resolution`` units (at least 200 per layer). Each option's cost is rounded
*up*, so the chosen assignment always fits the real budget; the optimum of the discretised
problem is within one unit per layer (0.5% of the budget) of the exact one (near-exact, not
greedy). fp32 is always a candidate, so layers
that hurt too much stay in floating point when the budget allows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from slimc.passes.analysis.criteria.divergence import divergence, output_kind
from slimc.passes.analysis.criteria.execution import calibration_batches, run_graph

from slimc.errors import UsageError
from slimc.ir import IR
from slimc.passmanager import PassContext

from .formats import Format, fake_quantize
from .layers import Layer


@dataclass
class Assignment:
    formats: dict[str, Format]
    predicted_damage: float
    bytes: float
    budget_bytes: float

    def to_json(self) -> dict:
        return {"formats": {k: str(v) for k, v in self.formats.items()},
                "predicted_damage": self.predicted_damage, "bytes": round(self.bytes),
                "budget_bytes": round(self.budget_bytes)}


def _memo(ctx: PassContext) -> dict:
    """{(weight, fingerprint, batches, format): damage}, kept on the context (it dies with it)."""
    return ctx.memo.setdefault("quantize.mixed.damage", {})


def _fingerprint(weight: torch.Tensor) -> tuple:
    flat = weight.detach().reshape(-1)
    return (tuple(weight.shape), float(flat.double().sum()), float(flat[:: 997].double().sum()))


@torch.no_grad()
def measure_damage(ir: IR, layers: Sequence[Layer], candidates: Sequence[Format],
                   batches: Sequence[Sequence[torch.Tensor]], wanted: np.ndarray | None = None,
                   memo: dict | None = None) -> np.ndarray:
    """``damage[i, j]``: output change with only layer ``i`` fake-quantized to ``candidates[j]``.

    Only the entries where ``wanted`` is true are measured (the rest are 0). The graph runs with
    the substituted weight in the weight's slot; the IR is not edited.
    """
    kind = output_kind(ir.output_names[0])
    table = np.zeros((len(layers), len(candidates)))
    if wanted is None:
        wanted = np.ones(table.shape, dtype=bool)
    references: list[torch.Tensor] | None = None
    for i, layer in enumerate(layers):
        if not wanted[i].any():
            continue
        stored = ir.get_weight(layer.weight_node)
        matrix = layer.matrix(ir)
        prefix = (layer.weight_node.name, _fingerprint(stored), len(batches))
        for j, fmt in enumerate(candidates):
            if fmt.kind == "fp32" or not wanted[i, j]:
                continue
            key = (*prefix, str(fmt))
            if memo is not None and key in memo:
                table[i, j] = memo[key]
                continue
            if references is None:
                references = [run_graph(ir, b)[0] for b in batches]
            fq = fake_quantize(matrix, fmt)
            value = layer.from_matrix(fq).to(stored.dtype)
            table[i, j] = sum(
                divergence(kind, ref, run_graph(ir, b, {layer.weight_node.name: value})[0])
                for ref, b in zip(references, batches, strict=True)) / len(batches)
            if memo is not None:
                memo[key] = table[i, j]
    return table


@dataclass
class DamageTable:
    damage: np.ndarray
    #: Per entry: "analysis" (sensitivity-perturbation), "measured" (here) or "fp32".
    source: np.ndarray
    info: dict = field(default_factory=dict)


def damage_table(ir: IR, ctx: PassContext, layers: Sequence[Layer],
                 candidates: Sequence[Format], max_batches: int = 4,
                 criterion: str = "perturbation") -> DamageTable:
    """Damage of every (layer, candidate): from the sensitivity analysis where it can express
    the format (int8 on linear layers), measured with the same batches and measure otherwise;
    with a proxy ``criterion``, scaled from the analysis's curves (see the module docstring)."""
    if criterion != "perturbation" and ctx.analyses is not None:
        return _proxy_table(ir, ctx, layers, candidates, max_batches, criterion)
    shape = (len(layers), len(candidates))
    damage = np.zeros(shape)
    source = np.full(shape, "measured", dtype=object)
    for j, fmt in enumerate(candidates):
        if fmt.kind == "fp32":
            source[:, j] = "fp32"
    info: dict = {"max_batches": max_batches}
    int8 = [j for j, fmt in enumerate(candidates) if fmt.kind == "int8"]
    if ctx.analyses is not None and int8:
        try:
            result = ctx.analyses.get("sensitivity", criterion="perturbation", bits=(8,),
                                      keep_ratios=(), rank_ratios=(), reference="q8",
                                      max_batches=max_batches)
        except (KeyError, UsageError, ValueError) as exc:  # not registered / no data
            info["analysis_error"] = f"{type(exc).__name__}: {exc}"
        else:
            by_weight = {entry.weight: entry for entry in result.layers.values()}
            for i, layer in enumerate(layers):
                entry = by_weight.get(layer.weight_node.name)
                if entry is None or layer.is_embedding or entry.kind != "linear" \
                        or "q8" not in entry.curve:
                    continue
                for j in int8:
                    damage[i, j] = entry.curve["q8"]
                    source[i, j] = "analysis"
            info["analysis"] = {"criterion": result.criterion, "batches": result.batches,
                                "seconds": round(result.seconds, 2)}
    wanted = source == "measured"
    if wanted.any():
        batches = calibration_batches(ir, ctx, max_batches)
        memo = _memo(ctx)
        measured = measure_damage(ir, layers, candidates, batches, wanted, memo)
        damage[wanted] = measured[wanted]
    info["entries"] = {k: int((source == k).sum()) for k in ("analysis", "measured", "fp32")}
    return DamageTable(damage, source, info)


def _proxy_table(ir: IR, ctx: PassContext, layers: Sequence[Layer],
                 candidates: Sequence[Format], max_batches: int, criterion: str) -> DamageTable:
    from slimc.passes.analysis.criteria.candidates import Setting

    from . import calib

    result = ctx.analyses.get("sensitivity", criterion=criterion, bits=(8, 4), keep_ratios=(),
                              rank_ratios=(), reference="q4", max_batches=max_batches)
    by_weight = {entry.weight: entry for entry in result.layers.values()}
    batches = calibration_batches(ir, ctx, max_batches)
    stats = calib.collect(ir, layers, batches, hessian=False)
    shape = (len(layers), len(candidates))
    damage = np.zeros(shape)
    source = np.full(shape, "analysis", dtype=object)
    missing = np.zeros(shape, dtype=bool)
    for i, layer in enumerate(layers):
        entry = by_weight.get(layer.weight_node.name)
        stored = ir.get_weight(layer.weight_node).detach().float()
        matrix = layer.matrix(ir)
        st = stats.get(layer.name)
        h = st.sq_sum.double() if st is not None and st.sq_sum is not None else None

        def error(approx: torch.Tensor, matrix=matrix, h=h) -> float:
            sq = (approx.double() - matrix.double()).pow(2)
            return float((sq * h).sum() if h is not None else sq.sum())

        for j, fmt in enumerate(candidates):
            if fmt.kind == "fp32":
                source[i, j] = "fp32"
                continue
            if entry is None:
                missing[i, j] = True
                source[i, j] = "measured"
                continue
            bits = 8 if fmt.kind == "int8" else 4  # int4/int3/int2 scale from the 4-bit curve
            ref = Setting("quantize", bits).apply(layer.canonical(stored))
            ref = ref.reshape(matrix.shape)
            e_ref = error(ref)
            damage[i, j] = entry.curve[f"q{bits}"] * error(fake_quantize(matrix, fmt)) / e_ref \
                if e_ref > 0 else 0.0
    if missing.any():
        damage[missing] = measure_damage(ir, layers, candidates, batches, missing,
                                         _memo(ctx))[missing]
    info = {"max_batches": max_batches,
            "analysis": {"criterion": result.criterion, "batches": result.batches,
                         "seconds": round(result.seconds, 2)},
            "entries": {k: int((source == k).sum()) for k in ("analysis", "measured", "fp32")}}
    return DamageTable(damage, source, info)


#: Budget units per layer in the knapsack DP (see ``solve``).
UNITS_PER_LAYER = 200


def solve(costs: np.ndarray, damage: np.ndarray, budget: float,
          resolution: int = 4000) -> list[int]:
    """Option index per layer minimising total damage with total cost <= ``budget``.

    Multiple-choice knapsack by DP over ``resolution`` budget units (costs rounded up).
    """
    n_layers, _ = costs.shape
    # Rounding each choice up loses < 1 unit per layer: with 200 units per layer that is at most
    # 0.5% of the budget (a fixed 4000 units left 2.6% of SmolLM2's 211-layer budget unused).
    resolution = max(resolution, UNITS_PER_LAYER * n_layers)
    unit = budget / resolution
    units = np.ceil(costs / unit - 1e-9).astype(np.int64)
    if costs.min(axis=1).sum() > budget * (1 + 1e-9):
        raise UsageError(
            f"The budget of {budget:,.0f} bytes is below the smallest possible size "
            f"({costs.min(axis=1).sum():,.0f} bytes) of the quantizable layers.",
            hint="Raise budget= (average bits per weight) or add smaller formats.")
    # Rounding up can make an exactly-fitting assignment look over budget by < 1 unit/layer.
    resolution = max(resolution, int(units.min(axis=1).sum()))
    inf = float("inf")
    best = np.zeros(resolution + 1)
    choice = np.zeros((n_layers, resolution + 1), dtype=np.int16)
    for i in range(n_layers):
        new = np.full(resolution + 1, inf)
        for j in range(costs.shape[1]):
            c = units[i, j]
            if c > resolution:
                continue
            cand = np.full(resolution + 1, inf)
            cand[c:] = best[: resolution + 1 - c] + damage[i, j]
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = j
        best = new
    b = int(np.argmin(best))
    picks = [0] * n_layers
    for i in reversed(range(n_layers)):
        j = int(choice[i, b])
        picks[i] = j
        b -= int(units[i, j])
    return picks


def assign(ir: IR, layers: Sequence[Layer], candidates: Sequence[Format], budget_bits: float,
           damage: np.ndarray) -> Assignment:
    """Formats for ``layers`` at ``budget_bits`` average bits per weight (overheads included)."""
    shapes = [tuple(layer.matrix(ir).shape) for layer in layers]
    costs = np.array([[fmt.nbytes(n, k) for fmt in candidates] for n, k in shapes])
    total = sum(n * k for n, k in shapes)
    budget = budget_bits * total / 8.0
    picks = solve(costs, damage, budget)
    formats = {layer.name: candidates[j] for layer, j in zip(layers, picks, strict=True)}
    used = float(sum(costs[i, j] for i, j in enumerate(picks)))
    predicted = float(sum(damage[i, j] for i, j in enumerate(picks)))
    return Assignment(formats, predicted, used, budget)


def uniform_bits(fmt: Format, shapes: Sequence[tuple[int, int]]) -> float:
    """Average bits per weight of ``fmt`` over layers of these shapes."""
    total = sum(n * k for n, k in shapes)
    return sum(fmt.nbytes(n, k) for n, k in shapes) * 8.0 / total if total else math.nan
