"""Where a budget-less search (``-O2/-O3/-Os``) builds its candidates: the damage table's
predicted drop, calibrated by every candidate measured, places the next one.

The search wants the smallest budget on its objective (size, or latency for ``-O3``) whose
built candidate's measured drop stays within ``--max-drop``. Every probe is a whole candidate:
the real passes on a clone, their check forwards, the score (~7 s each on a 320M decoder).
Bisecting the budget spent five of them per pruning ratio and family, although the damage
table already predicts every budget's drop: the summed single-layer damage of what the solver
picks there. That sum is off by a factor (damage is not additive: measured / predicted was
0.3-0.97 over the 320M's five bisection candidates, 0.88-0.97 near the chosen one), but the
factor changes slowly with the budget. So (issue 18):

1. :class:`PredictedCurve` tabulates the predicted drop against the budget once per pruning
   ratio and family: the multiple-choice knapsack's LP relaxation (every layer's lower convex
   hull of (cost, damage), segments taken by damage saved per unit of cost), exact at its
   breakpoints, a lower bound of the solver's integer optimum between them, milliseconds to
   build and to query.
2. :func:`next_budget` expects ``ratio(b) * predicted(b)`` at budget ``b``: ``ratio`` is
   measured / predicted at the probes so far, interpolated in log budget between them
   (constant beyond the outermost, 1 before the first). The next probe is the smallest budget
   inside the bracket (the largest budget that failed, the smallest that passed) whose
   expected drop is within ``max_drop``: the first probe goes where the table itself says the
   drop reaches ``max_drop``, each later one where the measurements so far say it does
   (regula falsi on the calibrated prediction rather than the midpoint).
3. It stops when that budget would save less than :data:`TOLERANCE` of the objective over the
   smallest passing budget, or the bracket is narrower than that; the search also stops after
   its build cap (the bisection's step count).

Safeguards: a probe stays at least :data:`TOLERANCE` above a failed budget, twice that after
two failures in a row, four times after three (a prediction that keeps promising too little
damage still moves the bracket: an exponential search from below), and while nothing has
passed and nothing below the top is predicted to, the log midpoint is probed (a bisection
step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Relative gain in the objective below which another probe is not worth a build; also the
#: narrowest bracket probed. 1%: the bisection's five steps ended within ~6% of the boundary.
TOLERANCE = 0.01
#: Budgets tried per query between the bracket's ends (log spaced): the probe's resolution
#: is the bracket's width / this, far finer than :data:`TOLERANCE` once the bracket narrows.
GRID = 2048
#: measured / predicted is kept within [1 / RATIO_LIMIT, RATIO_LIMIT] (a measured drop of 0,
#: or a prediction of 0, would otherwise send the next probe to an end of the bracket).
RATIO_LIMIT = 16.0


@dataclass(frozen=True)
class Probe:
    """One measured budget: the budget the solver was given (relative to the original), the
    curve's predicted drop there, and the built candidate's measured drop."""

    budget: float
    predicted: float
    drop: float


class PredictedCurve:
    """Predicted drop (summed single-layer damage) against the objective's budget, relative to
    the original model: the LP relaxation of the per-layer choice (see the module docstring).

    ``costs`` / ``damage``: ``[layer, option]`` tables (``inf``: not a choice for that layer);
    ``rest``: the cost no choice changes; ``original``: the objective's value of the model.
    """

    def __init__(self, costs: np.ndarray, damage: np.ndarray, rest: float,
                 original: float) -> None:
        start_cost, start_damage = 0.0, 0.0
        slopes: list[float] = []
        steps: list[tuple[float, float]] = []
        for cost_row, damage_row in zip(costs, damage, strict=True):
            ok = np.isfinite(cost_row) & np.isfinite(damage_row)
            if not ok.any():
                continue
            hull = _lower_hull(cost_row[ok], damage_row[ok])
            start_cost += hull[0][0]
            start_damage += hull[0][1]
            for (c0, d0), (c1, d1) in zip(hull, hull[1:], strict=False):
                slopes.append((d0 - d1) / (c1 - c0))
                steps.append((c1 - c0, d0 - d1))
        order = np.argsort(-np.asarray(slopes), kind="stable")
        cost_steps = np.array([steps[i][0] for i in order], dtype=np.float64)
        damage_steps = np.array([steps[i][1] for i in order], dtype=np.float64)
        self.budgets = (rest + start_cost + np.concatenate([[0.0], np.cumsum(cost_steps)])) \
            / original
        self.predicted = np.maximum(
            start_damage - np.concatenate([[0.0], np.cumsum(damage_steps)]), 0.0)

    def at(self, budgets: np.ndarray | float) -> np.ndarray:
        """Predicted drop at ``budgets`` (``inf`` below the smallest reachable budget)."""
        b = np.asarray(budgets, dtype=np.float64)
        out = np.interp(b, self.budgets, self.predicted)
        return np.where(b < self.budgets[0] * (1 - 1e-12), np.inf, out)


def _lower_hull(cost: np.ndarray, damage: np.ndarray) -> list[tuple[float, float]]:
    """The (cost, damage) points of one layer's options on their lower convex hull, cheapest
    first, damage strictly falling: what an LP relaxation of the choice may mix."""
    points = sorted(zip(cost.tolist(), damage.tolist(), strict=True))
    hull: list[tuple[float, float]] = []
    for c, d in points:
        if hull and d >= hull[-1][1]:  # costs as much or more and saves nothing
            continue
        while len(hull) >= 2:
            (c0, d0), (c1, d1) = hull[-2], hull[-1]
            # drop the middle point if it lies on or above the line from hull[-2] to (c, d)
            if (d1 - d0) * (c - c0) >= (d - d0) * (c1 - c0):
                hull.pop()
            else:
                break
        hull.append((c, d))
    return hull


def _ratio(budgets: np.ndarray, probes: Sequence[Probe]) -> np.ndarray:
    """measured / predicted at ``budgets``: log-interpolated in log budget between the probes,
    constant beyond them, 1 without any."""
    usable = sorted((p for p in probes if p.budget > 0), key=lambda p: p.budget)
    if not usable:
        return np.ones_like(budgets)
    limit = math.log(RATIO_LIMIT)
    xs = np.log([p.budget for p in usable])
    ys = np.array([_log_ratio(p, limit) for p in usable])
    return np.exp(np.interp(np.log(budgets), xs, ys))


def _log_ratio(probe: Probe, limit: float) -> float:
    if probe.predicted <= 0 and probe.drop <= 0:
        return 0.0
    if probe.predicted <= 0:
        return limit
    if probe.drop <= 0:
        return -limit
    return float(np.clip(math.log(probe.drop / probe.predicted), -limit, limit))


def next_budget(curve: PredictedCurve, probes: Sequence[Probe], max_drop: float,
                low: float, high: float) -> float | None:
    """The next budget to build, or None when no probe is worth a build.

    ``low``: the budget below which nothing is reachable; ``high``: the top of the range (the
    uncompressed choices), taken to pass. The bracket is (the largest failing budget or
    ``low``, the smallest passing budget or ``high``)."""
    failing = [p.budget for p in probes if p.drop > max_drop]
    passing = [p.budget for p in probes if p.drop <= max_drop]
    lo = max([low, *failing])
    hi = min([high, *passing])
    if not probes and hi <= lo * (1 + TOLERANCE):
        # A narrow range whose top was never built: a pruned family's uncompressed end (a tiny
        # Llama priced for AVX2: pruning alone 0.987 of the original's latency, every
        # compression 1% more) is taken to pass, not measured. Its compressed end is worth
        # one build when it is at least TOLERANCE below the original (budget 1.0); without
        # this -O3 built nothing on an AVX2 host.
        return lo if lo * (1 + TOLERANCE) <= 1.0 else None
    if hi <= lo * (1 + TOLERANCE):
        return None
    # not on top of a failed budget, and further above it after each failure in a row (an
    # exponential search from below: a prediction that keeps promising too much still moves)
    fails = next((i for i, p in enumerate(reversed(probes)) if p.drop <= max_drop),
                 len(probes))
    floor = lo * (1 + TOLERANCE) ** (2 ** max(fails - 1, 0))
    ceiling = hi / (1 + TOLERANCE)  # worth a build: at least TOLERANCE below the best
    if ceiling <= floor and not probes and lo <= ceiling:
        # a narrow range (a tiny model whose roofline latency every compression lowers by
        # 1-2%): the floor keeps a probe off a *failed* budget, and nothing has failed yet;
        # ``low`` is reachable, so the range's compressed end is still worth one build.
        # Without this, -O3 built nothing on a tiny Llama where int4 cut latency 1.5%.
        floor = lo
    if ceiling <= floor:
        return None
    grid = np.geomspace(floor, ceiling, GRID)
    expected = _ratio(grid, probes) * curve.at(grid)
    within = np.flatnonzero(expected <= max_drop)
    if within.size:
        return float(grid[within[0]])
    if passing:
        return None  # the calibrated prediction says the best passing budget is the edge
    return math.sqrt(lo * hi)  # nothing passed yet and nothing is predicted to: bisect
