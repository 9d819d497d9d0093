"""One choice per layer under several budgets: a multiple-choice knapsack on the first budget
(exact up to 0.5% rounding, :func:`slimc.passes.quantize.mixed.solve`), Lagrange multipliers
for the others (each multiplier bisected until its budget holds; HAWQ-V3 solves the same
problem as an ILP, this is its Lagrangian relaxation with an exact inner knapsack)."""

from __future__ import annotations

import numpy as np

from slimc.errors import UsageError
from slimc.passes.quantize.mixed import solve as knapsack


class Infeasible(Exception):
    """No assignment meets the budgets (the message says by how much)."""


#: Units of the absolute budgets in :class:`Infeasible` messages (a report read "needs
#: 0.01069, the budget allows 0.01007" under ``--budget latency=0.5``: seconds, not shares).
UNITS = {"latency": " s (cost model)", "size": " bytes"}


def solve(damage: np.ndarray, costs: dict[str, np.ndarray], limits: dict[str, float],
          rest: dict[str, float]) -> list[int]:
    """Option index per layer minimising total damage with ``rest[k] + Σ costs[k] <=
    limits[k]`` for every budget ``k`` (absolute units). Raises :class:`Infeasible`."""
    keys = list(limits)
    primary, secondary = keys[0], keys[1:]
    room = {k: limits[k] - rest[k] for k in keys}
    allowed = np.isfinite(damage)
    for k in keys:
        smallest = float(np.where(np.isfinite(costs[k]) & allowed, costs[k],
                                  np.inf).min(axis=1).sum())
        if room[k] <= 0 or smallest > room[k] * (1 + 1e-9):
            unit = UNITS.get(k, "")
            raise Infeasible(f"{k}: the smallest choice for every layer needs "
                             f"{rest[k] + smallest:.4g}{unit}, the budget allows "
                             f"{limits[k]:.4g}{unit}")
    scale = {k: room[k] for k in keys}
    finite_damage = np.where(np.isfinite(damage), damage, 0.0)
    unit = max(float(finite_damage.max()), 1e-12)  # multipliers in units of the worst damage
    lam = dict.fromkeys(secondary, 0.0)

    def picks_for(lam: dict[str, float]) -> list[int]:
        objective = damage.copy()
        for k, value in lam.items():
            if value:
                objective = objective + value * unit * costs[k] / scale[k]
        # an impossible option costs more than the whole budget (never picked; no overflow)
        cost = np.where(np.isfinite(costs[primary]) & np.isfinite(objective),
                        costs[primary], 2.0 * room[primary] + 1.0)
        try:
            return knapsack(cost, np.where(np.isfinite(objective), objective, 1e30),
                            room[primary])
        except UsageError as exc:
            raise Infeasible(str(exc)) from None

    def used(picks: list[int], k: str) -> float:
        return float(sum(costs[k][i, j] for i, j in enumerate(picks)))

    picks = picks_for(lam)
    for k in secondary:
        if used(picks, k) <= room[k]:
            continue
        lo, hi = 0.0, 1.0
        while used(picks_for({**lam, k: hi}), k) > room[k]:
            hi *= 4.0
            if hi > 1e9:
                raise Infeasible(f"{k}: no assignment within the {primary} budget also fits "
                                 f"{limits[k]:.4g}")
        for _ in range(30):
            mid = (lo + hi) / 2
            if used(picks_for({**lam, k: mid}), k) > room[k]:
                lo = mid
            else:
                hi = mid
        lam[k] = hi
        picks = picks_for(lam)
    for k in keys:
        if used(picks, k) > room[k] * (1 + 1e-9):
            raise Infeasible(f"{k}: {rest[k] + used(picks, k):.4g} over {limits[k]:.4g}")
    return picks
