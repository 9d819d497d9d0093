"""Selective perturbation: which layers get measured, what the others get, and that
``select=all`` is the criterion as it was (every layer measured); the hessian trace from the
taylor criterion's Fisher."""

from __future__ import annotations

import pytest
import torch
from slimc.passes.analysis.criteria.candidates import settings_from
from slimc.passes.analysis.criteria.execution import SuffixRunner, run_graph
from slimc.passes.analysis.criteria.perturbation import measure_output_change
from slimc.passes.analysis.criteria.selective import (
    choose_layers,
    fill_curves,
    rank_percentiles,
    rank_spread,
    spearman,
    voters,
)
from slimc.passes.analysis.layers import weight_layers

from slimc.analyze import AnalysisContext
from slimc.passmanager import AnalysisManager, PassManager
from slimc.plugins import get_registry
from tests.models import analysis_manager

torch.set_num_threads(2)
SETTINGS = {"bits": (8, 2), "keep_ratios": (0.5,), "rank_ratios": (0.25,), "reference": "q2",
            "groups": False}






def test_rank_percentiles_share_ties_and_spread_is_zero_when_proxies_agree():
    assert rank_percentiles({"a": 1.0, "b": 3.0, "c": 3.0, "d": 9.0}) == {
        "a": 0.0, "b": 0.5, "c": 0.5, "d": 1.0}
    same = {"a": 1.0, "b": 2.0, "c": 3.0}
    doubled = {k: 2 * v for k, v in same.items()}
    assert rank_spread({"m": same, "t": doubled}) == dict.fromkeys(same, 0.0)


def test_choose_layers_takes_disputed_layers_and_anchors():
    names = [f"l{i}" for i in range(11)]
    magnitude = {n: float(i) for i, n in enumerate(names)}
    taylor = dict(magnitude)
    taylor["l2"], taylor["l8"] = 8.5, 1.5  # the proxies disagree on l2 and l8 only
    proxies = {"magnitude": magnitude, "taylor": taylor}
    assert choose_layers(proxies, threshold=0.2, anchors=0) == ["l2", "l8"]
    # anchors: evenly spaced along the consensus order (l0 ... l10), both ends included
    assert choose_layers(proxies, threshold=0.2, anchors=3) == ["l0", "l2", "l5", "l8", "l10"]
    assert choose_layers(proxies, threshold=1.0, anchors=0) == []


def test_voters_leave_out_a_proxy_that_ranks_unlike_the_estimator():
    """A proxy whose ranking has nothing to do with taylor's (SmolLM2's magnitude) would make
    every layer look disputed; it does not vote. The estimator always does."""
    names = [f"l{i}" for i in range(12)]
    taylor = {n: float(i) for i, n in enumerate(names)}
    hessian = {n: 2.0 * v + (3.0 if n == "l4" else 0.0) for n, v in taylor.items()}
    noise = {n: float((7 * i) % 12) for i, n in enumerate(names)}  # a permutation
    assert spearman(taylor, hessian) > 0.9 and abs(spearman(taylor, noise)) < 0.3
    assert spearman(taylor, {n: 1.0 for n in names}) == 0.0  # constant: no agreement
    proxies = {"magnitude": noise, "taylor": taylor, "hessian": hessian}
    assert set(voters(proxies, 0.3)) == {"taylor", "hessian"}
    assert set(voters(proxies, -1.0)) == set(proxies)
    assert set(voters({"magnitude": noise, "taylor": taylor}, 0.99)) == {"taylor"}
    # without the noisy proxy only the layers taylor and hessian dispute get measured
    assert len(choose_layers(voters(proxies, 0.3), 0.1, 0)) < len(
        choose_layers(proxies, 0.1, 0))


def test_fill_curves_scales_the_estimate_by_the_median_measured_ratio():
    estimates = {"a": {"q4": 1.0, "q2": 2.0}, "b": {"q4": 2.0, "q2": 3.0},
                 "c": {"q4": 4.0, "q2": 8.0}, "d": {"q4": 0.5, "q2": 1.0}}
    measured = {"a": {"q4": 10.0, "q2": 20.0}, "b": {"q4": 20.0}, "c": {"q4": 400.0}}
    keys = dict.fromkeys(estimates, ["q4", "q2"])
    filled = fill_curves(measured, estimates, keys)
    assert filled["a"] == {"q4": 10.0, "q2": 20.0} and filled["c"]["q4"] == 400.0
    assert filled["b"]["q2"] == pytest.approx(30.0)  # its own measured ratio (10)
    assert filled["c"]["q2"] == pytest.approx(800.0)  # c's own ratio (100): proxy was wrong
    assert filled["d"]["q4"] == pytest.approx(5.0)  # median q4 ratio 10, not the mean 40
    assert filled["d"]["q2"] == pytest.approx(10.0)  # q2: only a measured, ratio 10


def test_select_all_measures_every_layer_as_before(captured_llama):
    """``select=all``: every curve is the measured output change with that layer alone
    compressed, exactly the criterion's definition before selection existed."""
    ir, batches = captured_llama
    am = analysis_manager(ir, batches)
    result = am.get("sensitivity", criterion="perturbation", select="all", **SETTINGS)
    layers = weight_layers(ir)
    assert all(v.extra["measured"] == 1.0 for v in result.layers.values())
    references = [run_graph(ir, b)[0] for b in batches]
    weights = ir.weights()
    for layer in layers[:4]:
        weight = layer.canonical(weights[layer.weight.name].detach())
        for setting in settings_from((8, 2), (0.5,), (0.25,)):
            compressed = layer.stored(setting.apply(weight, layer.canonical_output_axis))
            expected = measure_output_change(ir, batches, references, layer.weight.name,
                                             compressed)
            assert result.layers[layer.name].curve[setting.key] == pytest.approx(
                expected, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("measure_settings", ["reference", "all"])
def test_select_disagree_measures_the_disputed_layers_and_scales_the_rest(captured_llama,
                                                                          measure_settings):
    ir, batches = captured_llama
    am = analysis_manager(ir, batches)
    full = am.get("sensitivity", criterion="perturbation", select="all", **SETTINGS)
    picked = am.get("sensitivity-perturbation", select="disagree", threshold=0.3, anchors=2,
                    measure_settings=measure_settings, **SETTINGS)
    proxies = {c: am.get("sensitivity-" + c, **SETTINGS).scores("q2")
               for c in ("magnitude", "taylor", "hessian")}
    expected = set(choose_layers(voters(proxies, 0.3), threshold=0.3, anchors=2))
    measured = {n for n, v in picked.layers.items() if v.extra["measured"] == 1.0}
    assert measured == expected and 2 <= len(measured) < len(picked.layers)
    spread = rank_spread(voters(proxies, 0.3))  # the proxies that vote
    assert all(spread[n] <= 0.3 for n in set(picked.layers) - measured)
    taylor = am.get("sensitivity-taylor", **SETTINGS)
    for name, layer in picked.layers.items():
        assert set(layer.curve) == set(full.layers[name].curve)
        exact = (set(layer.curve) if measure_settings == "all" else {"q2"}) \
            if name in measured else set()
        for key in exact:  # measured values are the full criterion's
            assert layer.curve[key] == pytest.approx(full.layers[name].curve[key], rel=1e-4,
                                                     abs=1e-9)
        ratios = [layer.curve[k] / taylor.layers[name].curve[k] for k in layer.curve
                  if k not in exact and taylor.layers[name].curve[k] > 0]
        if measure_settings == "reference":  # one scale per layer: taylor's shape
            assert all(r == pytest.approx(ratios[0]) for r in ratios)
        assert all(r > 0 for r in ratios)
    # the proxies came from the analysis manager's cache (computed once)
    assert sum(1 for name, computed in am.history
               if name == "sensitivity-taylor" and computed) == 1


def test_select_disagree_groups_measured_where_proxies_disagree(captured_llama):
    ir, batches = captured_llama
    am = analysis_manager(ir, batches)
    settings = {**SETTINGS, "groups": True}
    full = am.get("sensitivity-perturbation", select="all", **settings)
    picked = am.get("sensitivity-perturbation", select="disagree", threshold=0.3, anchors=2,
                    **settings)
    assert set(picked.groups) == set(full.groups)
    same = [n for n, g in picked.groups.items() if any(
        g.curve[k] == pytest.approx(full.groups[n].curve[k], rel=1e-4, abs=1e-12)
        for k in g.curve)]
    assert 2 <= len(same) < len(full.groups)  # some measured (incl. anchors), not all
    for g in picked.groups.values():
        assert set(g.curve) == set(full.groups[g.name].curve) and all(
            v >= 0 for v in g.curve.values())


def test_hessian_trace_is_the_taylor_fisher_trace_without_another_backward(captured_llama):
    ir, batches = captured_llama
    ctx = AnalysisContext(example_inputs=batches[0], calibration_batches=batches)
    ctx.analyses = am = AnalysisManager(ir, ctx, PassManager(get_registry().passes).lookup)
    taylor = am.get("sensitivity-taylor", **SETTINGS)
    hessian = am.get("sensitivity-hessian", **SETTINGS)  # estimator=fisher is the default
    for name, layer in hessian.layers.items():
        assert layer.extra["hessian_trace"] == pytest.approx(
            taylor.layers[name].extra["fisher_trace"], rel=1e-9)
    memo = ctx.memo["sensitivity-fisher"][ir][1]
    assert len(memo) == 1  # one Fisher computation served both criteria
    hutchinson = am.get("sensitivity-hessian", estimator="hutchinson", samples=2, **SETTINGS)
    assert set(hutchinson.layers) == set(hessian.layers)



def test_suffix_runner_gives_the_full_forward_with_a_weight_replaced(captured_llama):
    """Perturbation forwards start at the first op reading the changed weight; the prefix's
    values come from one reference run. Same outputs as running the whole graph."""
    ir, batches = captured_llama
    layers = weight_layers(ir)
    weights = ir.weights()
    runner = SuffixRunner(ir, batches[0], [layer.weight.name for layer in layers])
    starts = {runner.start_of([layer.weight.name]) for layer in layers}
    assert len(starts) > 4  # later layers really skip a prefix
    for layer in layers:
        changed = {layer.weight.name: weights[layer.weight.name] * 0.5}
        torch.testing.assert_close(runner.run(changed)[0], run_graph(ir, batches[0], changed)[0],
                                   rtol=0, atol=0)
    both = {layers[3].weight.name: weights[layers[3].weight.name] * 0,
            layers[9].weight.name: weights[layers[9].weight.name] * 2}
    torch.testing.assert_close(runner.run(both)[0], run_graph(ir, batches[0], both)[0],
                               rtol=0, atol=0)
