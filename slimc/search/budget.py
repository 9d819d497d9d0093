"""``--budget`` and the ``-O`` levels: what the search is asked to reach."""

from __future__ import annotations

from dataclasses import dataclass

from slimc.errors import UsageError

#: Budget keys, in the order the solver treats them (the first given is solved exactly).
KEYS = ("size", "latency", "params")


@dataclass(frozen=True)
class Budget:
    """Limits relative to the original model (1.0 = the original, 0.25 = a quarter).

    ``size``: weight bytes as stored in the artifact (scales and zero points included);
    ``latency``: the target's cost-model latency; ``params``: stored parameter count (a
    quantized weight still counts one parameter per weight).
    """

    size: float | None = None
    latency: float | None = None
    params: float | None = None

    def limits(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in KEYS if getattr(self, k) is not None}

    def __bool__(self) -> bool:
        return bool(self.limits())

    def __str__(self) -> str:
        return ",".join(f"{k}={v:g}" for k, v in self.limits().items())


def parse_budget(text: str | None) -> Budget:
    """``size=0.25,latency=0.5`` -> :class:`Budget` (UsageError naming the fix otherwise)."""
    if not text:
        return Budget()
    values: dict[str, float] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in KEYS:
            raise UsageError(f"--budget {text!r}: {item!r} is not one of size=, latency=, "
                             "params=.", hint="Give limits relative to the original model, "
                             "e.g. --budget size=0.25 or --budget size=0.5,latency=0.6.")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not 0.0 < number <= 1.0:
            raise UsageError(f"--budget {key}={value.strip()} is not a share of the original "
                             "model in (0, 1].", hint=f"e.g. --budget {key}=0.25 for a quarter "
                             "of the original.")
        values[key] = number
    return Budget(**values)


@dataclass(frozen=True)
class Level:
    """One searching ``-O`` level: which techniques, what it minimises, default max drop."""

    name: str
    #: Techniques the search may use (see :class:`slimc.search.space.Techniques`).
    techniques: str
    #: ``size`` or ``latency``: what the search makes as small as --max-drop allows.
    objective: str
    default_max_drop: float
    summary: str


#: ``-O`` levels that search (``-O0``/``-O1`` are fixed pipelines in slimc.compiler).
SEARCH_LEVELS: dict[str, Level] = {
    "2": Level("2", "precision", "size", 0.01,
               "per-layer precision (int8/int4/fp32) chosen by measurement: the smallest "
               "weights within --max-drop (default 1%)"),
    "3": Level("3", "all", "latency", 0.03,
               "aggressive: pruning, low-rank and per-layer precision together, the lowest "
               "target latency (cost model) within --max-drop (default 3%)"),
    "s": Level("s", "all", "size", 0.01,
               "smallest: pruning, low-rank and per-layer precision together, the fewest "
               "weight bytes within --max-drop (default 1%)"),
}

#: ``--budget`` without a searching ``-O`` level uses every technique.
BUDGET_TECHNIQUES = "all"
