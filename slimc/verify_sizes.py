"""Which sizes a dynamic-shape artifact is verified at after the build.

A library with symbolic extents has code that only some sizes exercise: peeled loop tails,
edge tiles with clamped indices, run-time parallel-or-serial guards. The example length alone
hits one combination of them. Checking every length is unaffordable, and checking the maximum
(the old policy) can cost far more than the build (a 2048-token forward of a 1024-token
example is ~4x the FLOPs, and attention grows with the square). The policy:

* **1**: the smallest input (every loop a tail, every tile an edge tile);
* **37**: odd and not a multiple of any tile, vector width or thread count slimc uses;
* **the example length** (the check that always ran);
* **the longest length whose cost is within** :data:`COST_RATIO` **x the example's**, where
  the cost is the IR's FLOP count as a function of the length (fitted exactly through the
  lengths above: transformer cost is a quadratic in the length).

Lengths are clamped into the symbol's bounds. Under an emulator (cross targets) every token
costs ~100x its native time, so only a short input and the smallest size run there; the rest
is reported in ``not_checked``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: An odd length that is not a multiple of any tile (8, 16, 32), vector width or thread count.
ODD_LENGTH = 37
#: The longest length checked costs at most this many times the example length's FLOPs.
COST_RATIO = 8.0
POLICY = (f"lengths 1, {ODD_LENGTH} (odd, not a multiple of any tile), the example length, and "
          f"the longest length whose cost (FLOPs) is within {COST_RATIO:g}x the example's; "
          "clamped into the bounds")
EMULATED_POLICY = ("under the emulator: a short input and the smallest size only (every token "
                   "costs ~100x its native time there)")


@dataclass(frozen=True)
class SizePlan:
    """The lengths to check for one symbol and what the policy leaves out."""

    symbol: str
    #: (length, role) in checking order; ``role`` says why the policy picked it.
    lengths: list[tuple[int, str]] = field(default_factory=list)
    #: The longest length checked and the bound above it (None: the maximum is checked).
    not_checked: str | None = None


def primary_symbol(symbols: Sequence[str]) -> str | None:
    """The symbol the length policy applies to: the sequence if there is one, else the first
    (other symbols, e.g. a dynamic batch, stay at their example size)."""
    if not symbols:
        return None
    return "seq" if "seq" in symbols else symbols[0]


def fit_cost(points: dict[int, float]) -> Callable[[int], float]:
    """Cost as a function of the length through the measured ``points`` (length -> FLOPs): the
    quadratic through three lengths (a transformer's cost is ``a + b*L + c*L^2``: exact), a line
    through two, a proportion through one."""
    lengths = sorted(points)
    xs = np.array(lengths, dtype=np.float64)
    ys = np.array([points[n] for n in lengths], dtype=np.float64)
    if len(lengths) == 1:
        scale = ys[0] / max(xs[0], 1.0)
        return lambda n: scale * n
    coeffs = np.polyfit(xs, ys, min(2, len(lengths) - 1))
    return lambda n: max(float(np.polyval(coeffs, n)), 0.0)


def longest_within(cost: Callable[[int], float], example: int, high: int,
                   ratio: float = COST_RATIO) -> int:
    """The longest length in ``[example, high]`` whose cost is at most ``ratio`` x the
    example's (cost is assumed not to decrease with the length)."""
    budget = ratio * cost(example)
    if cost(high) <= budget:
        return high
    lo, hi = example, high  # cost(lo) <= budget < cost(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    return lo


def plan_lengths(symbol: str, example: int, low: int, high: int | None,
                 cost: Callable[[int], float] | None) -> SizePlan:
    """The policy's lengths for ``symbol`` (bounds ``low..high``, example size ``example``)."""
    high = high if high is not None else example
    picked: list[tuple[int, str]] = []

    def add(n: int, role: str) -> None:
        n = max(low, min(high, n))
        if all(n != m for m, _ in picked):
            picked.append((n, role))

    add(example, "example")
    add(1, "shortest")
    add(ODD_LENGTH, "odd length")
    longest = example if cost is None else longest_within(cost, example, high)
    add(longest, f"longest within {COST_RATIO:g}x the example's cost")
    longest_checked = max(n for n, _ in picked)
    not_checked = None
    if longest_checked < high:
        not_checked = (f"{symbol} {longest_checked + 1}..{high}: each costs more than "
                       f"{COST_RATIO:g}x the example length ({example}); run the artifact "
                       "at those lengths (slimc run) to check them")
    return SizePlan(symbol, picked, not_checked)


def verification_record(emulated: bool, shapes: list[dict[str, Any]],
                        not_checked: str | None) -> dict[str, Any]:
    """The manifest's ``verification`` additions for a dynamic artifact."""
    return {"policy": EMULATED_POLICY if emulated else POLICY, "shapes": shapes,
            "not_checked": not_checked}
