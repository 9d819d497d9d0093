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


def test_refine_keeps_the_worst_w8a8_layers_float_while_it_measures_better():
    """After a uniform W8A8 win, the layers whose calibrated int8 inputs erred most stay fp32
    one at a time (MiniLM `latency=0.5`: W8A8 is the one technique that reaches it and left
    part of the budget unspent); each kept only when it measures better within the budget."""
    from slimc.passes.analysis.hardware import hardware_for_target

    from slimc.search.search import REFINE_STEPS, Search, proxy_scorer
    from slimc.search.space import Techniques
    from tests.test_budget import _compute_bound_bert, _search_context

    ir, example, calib = _compute_bound_bert()
    registry, ctx = _search_context(ir, example, calib, "x86-64-v4-vnni")
    search = Search(ir, ctx, registry, Techniques.for_context("precision", ctx),
                    proxy_scorer(ir, ctx), hardware_for_target(ctx.target))
    w8a8 = search.w8a8_candidate(search.base(0.0), {"latency": 1.0}, keep=False)
    assert w8a8 is not None and w8a8.w8a8_errors and w8a8.w8a8.kept_float == ()
    worst = max(w8a8.w8a8_errors, key=w8a8.w8a8_errors.get)
    built = len(search.measured)
    refined = search.refine(w8a8, {"latency": 1.0}, None, keep=False)
    steps = search.measured[built:]
    assert 1 <= len(steps) <= REFINE_STEPS
    first = dict(steps[0].items)["quantize"]
    assert first == {"weights": "int8", "activations": "int8", "layers": f"{worst}=fp32"}
    assert steps[0].choices["fp32"] == 1
    assert refined.drop <= w8a8.drop
    if refined is not w8a8:  # a float layer kept: its recipe says so, and it costs latency
        assert refined.w8a8.kept_float and refined.relative["latency"] > w8a8.relative["latency"]
    # a budget with no room for a float layer: nothing kept, the W8A8 candidate stays
    tight = {"latency": w8a8.relative["latency"] * 1.001}
    assert search.refine(w8a8, tight, None, keep=False) is w8a8
