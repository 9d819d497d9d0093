"""How ``slimc compile`` runs the search: which mode the options ask for, the run itself, and
the manifest entry and recipe that come out of it."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from slimc.errors import UsageError
from slimc.jobs import pool_workers

from .budget import BUDGET_TECHNIQUES, SEARCH_LEVELS, Budget, Level, parse_budget

#: Fixed ``-O`` pipelines (the searching levels are in :data:`.budget.SEARCH_LEVELS`).
#: ``-O1`` only runs exact transforms: shared tensors stored once, weights that already lie
#: on a format's grid stored in it (a dequantized GGUF's int4 grids, a bf16 checkpoint's
#: bf16; batch norms stay unfolded: folding moves conv weights off their grids), dead code
#: removed.
FIXED_LEVELS: dict[str, str] = {
    "0": "",
    "1": "share{dedup=true,tie_head=true,basis=false},"
         "quantize{weights=exact,fold_batchnorm=false},eliminate-dead-code",
}

LEVEL_NAMES = ("0", "1", "2", "3", "s")


def normalise_level(level: int | str) -> str:
    text = str(level).strip().lower().removeprefix("-o")
    if text not in LEVEL_NAMES:
        raise UsageError(f"-O{level} is not a known optimisation level.",
                         hint="Use one of -O0 (no compression), -O1 (lossless), -O2 "
                         "(automatic, default max drop 1%), -O3 (aggressive) or -Os "
                         "(smallest within --max-drop).")
    return text


@dataclass(frozen=True)
class SearchPlan:
    """What to search for: a budget, or the smallest/fastest within ``max_drop``."""

    budget: Budget
    max_drop: float | None
    techniques: str
    objective: str
    level: Level | None
    #: Seconds of distillation the search may spend when nothing meets ``max_drop``
    #: (``--distill-budget``; 0: never; see :mod:`.recovery`).
    distill_budget: float = 300.0

    def describe(self) -> str:
        what = f"--budget {self.budget}" if self.budget else \
            f"-O{self.level.name}: {self.level.summary}"
        drop = f", --max-drop {self.max_drop:g}" if self.max_drop is not None else ""
        return what + drop


def plan_search(options) -> SearchPlan | None:
    """The search the options ask for (None: a fixed pipeline). Cheap: runs before the model
    is loaded, so contradictory options fail in a second."""
    budget = parse_budget(getattr(options, "budget", None))
    level = normalise_level(options.opt_level)
    explicit = bool(options.pipeline or options.recipe)
    if budget and explicit:
        raise UsageError("--budget chooses the pipeline itself; it cannot be combined with "
                         "--pipeline or --recipe.", hint="Drop --pipeline/--recipe to let "
                         "the search choose, or drop --budget to run your pipeline.")
    if explicit or (not budget and level not in SEARCH_LEVELS):
        return None
    chosen = SEARCH_LEVELS.get(level)
    max_drop = options.max_drop
    if max_drop is None and not budget and chosen is not None:
        max_drop = chosen.default_max_drop
    techniques = chosen.techniques if chosen is not None else BUDGET_TECHNIQUES
    objective = chosen.objective if chosen is not None else "size"
    from .search import DISTILL_BUDGET_S

    distill = getattr(options, "distill_budget", None)
    return SearchPlan(budget, max_drop, techniques, objective, chosen,
                      DISTILL_BUDGET_S if distill is None else float(distill))


def run_search(plan: SearchPlan, ir, ctx, registry, spec, task, log: Callable[[str], None],
               warnings: list[str]):
    """Run ``plan`` on ``ir``; returns (chosen Candidate or None, manifest entry)."""
    t0 = time.perf_counter()
    with _fastest_torch_threads(ir, ctx.calibration(1)[0]):
        return _search(plan, ir, ctx, registry, task, log, warnings, t0)


@contextmanager
def _fastest_torch_threads(ir, batch):
    """Run the search's many small forwards with 1 torch thread when that is faster (on a
    busy machine, idle-spinning intra-op threads made a tiny model's forward 100x slower)."""
    import torch

    before = torch.get_num_threads()

    def timed() -> float:
        ir.run(batch)
        start = time.perf_counter()
        ir.run(batch)
        return time.perf_counter() - start

    several = timed()
    torch.set_num_threads(1)
    if before > 1 and timed() > several:
        torch.set_num_threads(before)
    try:
        # the choice is about intra-op threads: the search's pools of single-threaded
        # workers (the damage table, quantize's packing) keep one worker per core either way
        with pool_workers(before):
            yield
    finally:
        torch.set_num_threads(before)


def _search(plan: SearchPlan, ir, ctx, registry, task, log, warnings, t0):
    from slimc.passes.analysis.hardware import hardware_if_known

    from .search import Search, describe_hardware, proxy_scorer, task_scorer
    from .space import Techniques

    scorer = task_scorer(task) if task is not None else proxy_scorer(ir, ctx)
    hw = hardware_if_known(ctx.target)
    techniques = Techniques.for_context(plan.techniques, ctx)
    if plan.budget:  # -qs formats for size budgets below int4-g32-fz's bytes (on CPUs)
        techniques = techniques.for_size(plan.budget.size, ctx)
    search = Search(ir, ctx, registry, techniques, scorer, hw, log)
    failures: list[str] = []
    if plan.budget:
        chosen, failures = search.fit(plan.budget, plan.max_drop)
    else:
        chosen = search.minimize(plan.objective, plan.max_drop)
    recovery = None
    if chosen is None and plan.max_drop is not None:
        from .recovery import recover

        log(f"search: nothing met --max-drop {plan.max_drop:g}; trying distillation "
            f"(--distill-budget {plan.distill_budget:g} s)")
        chosen, recovery = recover(search, plan.budget.limits(), plan.max_drop,
                                   plan.distill_budget)
        if chosen is None:
            log(f"search: distillation: {recovery['why_not']}")
    entry: dict[str, Any] = {
        "request": plan.describe(),
        "algorithm": "per-layer multiple-choice knapsack on measured single-layer damage "
                     "(Lagrange multipliers for further budgets), then build + measure + "
                     "back-off of the most damaging choices (docs/budget.md)",
        "metric": {"kind": scorer.kind, "label": scorer.label, "original": scorer.original,
                   "higher_is_better": scorer.higher_is_better},
        "budget": plan.budget.limits(), "max_drop": plan.max_drop,
        "techniques": plan.techniques,
        "hardware": describe_hardware(space, *search.int8_note())
        if (space := search.any_space()) is not None else None,
        # weights already on a format's grid (a model dequantized from a quantized file):
        # the lossless candidate, used or why not (docs/budget.md); None when none is exact
        "lossless": search.exact,
        "candidates": [c.summary() for c in search.measured],
        "chosen": chosen.summary() if chosen is not None else None,
        "failures": failures,
        # recovery by distillation when nothing met --max-drop: tried or why not, the steps,
        # the drop before and after (docs/budget.md); None when it was not needed
        "distillation": recovery,
        "seconds": round(time.perf_counter() - t0, 2),
        # where they went: measuring the choice space (damage table) vs building and scoring
        "seconds_by_phase": {k: round(v, 2) for k, v in search.seconds.items()},
    }
    if chosen is None and plan.budget:
        raise infeasible_error(plan, search, failures, recovery)
    if chosen is None and not search.measured:  # nothing built: the drop is not why
        from .probes import TOLERANCE

        entry["why_none"] = (f"no compression lowers the {plan.objective} by {TOLERANCE:.0%} "
                             "or more on this target (cost model), so no candidate was built")
        warnings.append(f"-O{plan.level.name}: {entry['why_none']}; compiled losslessly "
                        "instead.")
    elif chosen is None:
        warnings.append(f"-O{plan.level.name}: no compression stayed within --max-drop "
                        f"{plan.max_drop:g} ({scorer.label}); compiled losslessly instead"
                        + (f" (distillation: {recovery['why_not']})" if recovery else "")
                        + ".")
    elif chosen.distill:
        d = chosen.distill
        warnings.append(f"the search met --max-drop {plan.max_drop:g} only with "
                        f"distillation ({d['steps']} steps: drop {d['drop_before']:.2%} -> "
                        f"{d['drop_after']:.2%}); the recipe needs the same --calib data to "
                        "reproduce it.")
    return chosen, entry


def infeasible_error(plan: SearchPlan, search, failures: list[str],
                     recovery: dict[str, Any] | None = None) -> UsageError:
    """Exit 2: the budget cannot be met (within --max-drop); say what came closest."""
    within = [c for c in search.measured if c.distill is None  # (theirs: other held-out data)
              and all(c.relative[k] <= v * (1 + 1e-6) for k, v in plan.budget.limits().items())]
    closest = min(within, key=lambda c: c.drop, default=None)
    best = (f" The best candidate within the budget lost {closest.drop:.2%} "
            f"({closest.summary()['pipeline']})." if closest is not None else "")
    reasons = "; ".join(failures) or "no candidate"
    distilled = f" Distillation: {recovery['why_not']}." if recovery else ""
    return UsageError(
        f"No compression meets --budget {plan.budget}"
        + (f" with --max-drop {plan.max_drop:g}" if plan.max_drop is not None else "")
        + f": {reasons}.{best}{distilled} No artifact was written.",
        hint="Raise the budget (e.g. a larger size=), allow a larger --max-drop, give "
        "distillation calibration data and time (--calib with 2+ batches, --distill-budget "
        "SECONDS), or run `slimc explore MODEL` to see which sizes keep which quality.")


def recipe_data(items, target: str | None, inputs, description: str) -> dict[str, Any]:
    """A recipe (see :mod:`slimc.recipe`) that ``slimc compile --recipe`` reproduces."""
    data: dict[str, Any] = {"description": description}
    if target:
        data["target"] = target
    if inputs:
        data["inputs"] = list(inputs)
    # An empty pipeline stays empty: it is the original model (-O0). Filling it with
    # eliminate-dead-code made `slimc explore`'s original point reproduce a smaller model
    # (MiniLM's unused pooler removed: size 0.993) than the 1.0 it reports.
    data["pipeline"] = [{name: dict(opts)} if opts else name for name, opts in items]
    return data


def write_recipe(path, candidate, target: str | None, inputs, description: str) -> None:
    """The chosen pipeline as a recipe file."""
    import yaml

    if any(name == "distill" for name, _ in candidate.items):
        description += ("; its distill pass trains on --calib: compile it with the same --calib "
                        "and --calib-batches to reproduce the weights")
    if any(name == "quantize" and opts.get("activations") == "int8"
           for name, opts in candidate.items):
        description += ("; its int8 activation scales are calibrated on --calib: compile it "
                        "with the same --calib and --calib-batches to reproduce them")
    path.write_text(yaml.safe_dump(recipe_data(candidate.items, target, inputs, description),
                                   sort_keys=False, width=100))
