"""The search's last step: when one format on every layer measured best, the budget's slack
goes to its most damaged layers while the measured metric improves (MiniLM / WordSim-353:
uniform int4-g32-fz beat every knapsack candidate at size 0.5 and 0.25, issue 17)."""

from __future__ import annotations

from slimc.capture import capture, load_model
from slimc.passmanager import AnalysisManager, PassContext, PassManager
from slimc.plugins import get_registry
from slimc.search.budget import parse_budget


def test_refine_spends_the_slack_of_a_uniform_win_on_its_most_damaged_layers(hf_dir):
    from slimc.search.search import REFINE_STEPS, Search, proxy_scorer
    from slimc.search.space import Techniques

    registry = get_registry()
    ir, example = capture(load_model(hf_dir("llama")))
    ctx = PassContext(example_inputs=example)
    ctx.analyses = AnalysisManager(ir, ctx, PassManager(registry.passes).lookup)
    search = Search(ir, ctx, registry, Techniques(formats=("int8", "int4-g32-fz")),
                    proxy_scorer(ir, ctx), None)
    best, failures = search.fit(parse_budget("size=0.5"), None)
    assert best is not None, failures
    uniform = next(c for c in search.measured if c.uniform == "int4-g32-fz")
    assert uniform.picks is not None and uniform.relative["size"] < 0.25
    space = search.base(0.0).space
    worst = max(range(len(space.layers)), key=lambda i: space.damage[i, uniform.picks[i]])

    built = len(search.measured)
    refined = search.refine(uniform, {"size": 0.5}, None, keep=False)
    steps = search.measured[built:]
    assert 1 <= len(steps) <= REFINE_STEPS
    # the first step gives the most damaged layer its least damaging choice (fp32 fits)
    assert steps[0].picks[worst] == 0
    assert sum(a != b for a, b in zip(steps[0].picks, uniform.picks, strict=True)) == 1
    assert all(c.relative["size"] <= 0.5 for c in steps)
    # each step kept only when measured better; never worse than where it started
    assert refined.drop <= uniform.drop
    assert (refined is uniform) == all(c.drop >= uniform.drop for c in steps)

    # a knapsack candidate (it fills the budget) is not stepped from
    knapsack = next(c for c in search.measured if c.uniform is None and c.picks is not None)
    before = len(search.measured)
    assert search.refine(knapsack, {"size": 0.5}, None, keep=False) is knapsack
    assert len(search.measured) == before
