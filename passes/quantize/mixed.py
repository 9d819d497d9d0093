"""Mixed precision: choose each layer's format to minimise predicted damage under a byte budget.

Damage model: the output perturbation of quantizing one layer alone, measured on calibration
data (relative squared L2 error of the model's float outputs), assumed additive across layers
as in HAWQ/HAQ-style allocation. TODO(sensitivity): these per-layer curves belong in the
``sensitivity`` analysis (helper B's ``passes/analysis/sensitivity.py``); :func:`damage_table`
uses it when it is registered and provides ``curves`` and measures them itself otherwise.

Solver: a multiple-choice knapsack solved by dynamic programming over the byte budget
discretised into ``resolution`` units. Each option's cost is rounded *up*, so the chosen
assignment always fits the real budget; the optimum of the discretised problem is within one
unit per layer of the exact one (near-exact, not greedy). fp32 is always a candidate, so layers
that hurt too much stay in floating point when the budget allows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from slimc.errors import UsageError
from slimc.ir import IR

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


def _output_error(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    num = den = 0.0
    for ref, out in zip(reference, outputs, strict=True):
        if ref.is_floating_point():
            num += float((ref.double() - out.double()).pow(2).sum())
            den += float(ref.double().pow(2).sum())
    return num / max(den, 1e-30)


@torch.no_grad()
def measure_damage(ir: IR, layers: Sequence[Layer], candidates: Sequence[Format],
                   batches: Sequence[Sequence[torch.Tensor]]) -> np.ndarray:
    """``damage[i, j]``: output error with only layer ``i`` fake-quantized to ``candidates[j]``."""
    reference = [ir.run(b) for b in batches]
    table = np.zeros((len(layers), len(candidates)))
    for i, layer in enumerate(layers):
        stored = ir.get_weight(layer.weight_node)
        original = stored.detach().clone()
        matrix = layer.matrix(ir)
        for j, fmt in enumerate(candidates):
            if fmt.kind == "fp32":
                continue
            fq = fake_quantize(matrix, fmt)
            stored.data.copy_(fq.t() if layer.transposed else fq)
            table[i, j] = sum(_output_error(r, ir.run(b))
                              for r, b in zip(reference, batches, strict=True)) / len(batches)
        stored.data.copy_(original)
    return table


def solve(costs: np.ndarray, damage: np.ndarray, budget: float,
          resolution: int = 4000) -> list[int]:
    """Option index per layer minimising total damage with total cost <= ``budget``.

    Multiple-choice knapsack by DP over ``resolution`` budget units (costs rounded up).
    """
    n_layers, _ = costs.shape
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
           batches: Sequence[Sequence[torch.Tensor]], damage: np.ndarray | None = None
           ) -> Assignment:
    """Formats for ``layers`` at ``budget_bits`` average bits per weight (overheads included)."""
    shapes = [tuple(layer.matrix(ir).shape) for layer in layers]
    costs = np.array([[fmt.nbytes(n, k) for fmt in candidates] for n, k in shapes])
    total = sum(n * k for n, k in shapes)
    budget = budget_bits * total / 8.0
    if damage is None:
        damage = measure_damage(ir, layers, candidates, batches)
    picks = solve(costs, damage, budget)
    formats = {layer.name: candidates[j] for layer, j in zip(layers, picks, strict=True)}
    used = float(sum(costs[i, j] for i, j in enumerate(picks)))
    predicted = float(sum(damage[i, j] for i, j in enumerate(picks)))
    return Assignment(formats, predicted, used, budget)


def uniform_bits(fmt: Format, shapes: Sequence[tuple[int, int]]) -> float:
    """Average bits per weight of ``fmt`` over layers of these shapes."""
    total = sum(n * k for n, k in shapes)
    return sum(fmt.nbytes(n, k) for n, k in shapes) * 8.0 / total if total else math.nan
