"""``slimc analyze`` speed (issue 16): the prunable groups' candidates are computed once for
every criterion, with per-unit norms gathered in one pass per weight instead of one slice per
unit; the same units are removed."""

from __future__ import annotations

import pytest
import torch
from slimc.passes.analysis.criteria.groups import group_candidates, unit_norms

from tests.models import analysis_manager


def _sliced_norms(weights, units) -> torch.Tensor:
    """The per-unit loop ``group_candidates`` used before (one ``index_select`` per slice)."""
    norms = torch.zeros(len(units), dtype=torch.float64)
    for i, unit in enumerate(units):
        for (w, axis), idx in unit.slices.items():
            sl = weights[w].detach().index_select(axis, torch.tensor(idx)).double()
            norms[i] += sl.pow(2).sum()
    return norms


def test_unit_norms_equal_the_per_unit_slices_and_remove_the_same_units(captured_llama):
    ir, batches = captured_llama
    am = analysis_manager(ir, batches)
    groups = am.get("prune-groups").groups
    weights = ir.weights()
    assert {g.kind for g in groups} >= {"mlp-channel", "kv-group"}
    for group in groups:
        fast, slow = unit_norms(weights, group.units), _sliced_norms(weights, group.units)
        torch.testing.assert_close(fast, slow, rtol=1e-12, atol=0)
        assert fast.argsort().tolist() == slow.argsort().tolist()


def test_group_candidates_are_computed_once_for_every_criterion(captured_llama):
    ir, batches = captured_llama
    am = analysis_manager(ir, batches)
    first = group_candidates(ir, am._ctx, (0.75, 0.5))
    assert group_candidates(ir, am._ctx, (0.75, 0.5)) is first  # the memo's
    assert group_candidates(ir, am._ctx, (0.5,)) is not first  # other ratios: computed anew
    settings = {"bits": (8, 4), "keep_ratios": (0.5,), "rank_ratios": (0.5,),
                "reference": "q4", "groups": True}
    magnitude = am.get("sensitivity-magnitude", **settings)
    taylor = am.get("sensitivity-taylor", **settings)
    assert set(magnitude.groups) == set(taylor.groups) and magnitude.groups
    for name, group in magnitude.groups.items():
        assert group.removed == taylor.groups[name].removed


def test_label_propagation_runs_single_threaded_with_the_same_groups(captured_llama):
    """``propagate`` runs on one torch thread (its small integer ops cost 20-50x the CPU on the
    multi-thread pool) and gives the groups the multi-threaded propagation gives; the caller's
    thread count is back afterwards."""
    from slimc.passes.prune.groups import build_groups
    from slimc.passes.prune.labels import LabelPropagator, propagate

    from slimc.jobs import single_threaded

    ir, _ = captured_llama
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            threaded = build_groups(ir, LabelPropagator(ir, True).run())
        single = build_groups(ir, propagate(ir))
        assert torch.get_num_threads() == 2
        with single_threaded():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert single.to_json() == threaded.to_json()
    assert single.groups


def test_one_fisher_with_one_label_sample_serves_taylor_and_hessian(captured_llama):
    """The Fisher diagonal is computed once, with one sampled label per calibration batch (the
    default since analyze round 6), and the hessian trace reads the same memo entry."""
    from slimc.passes.analysis.criteria.taylor import TaylorOptions

    ir, batches = captured_llama
    am = analysis_manager(ir, batches)
    settings = {"bits": (4,), "keep_ratios": (0.5,), "rank_ratios": (0.5,), "groups": False}
    taylor = am.get("sensitivity-taylor", **settings)
    hessian = am.get("sensitivity-hessian", **settings)
    assert TaylorOptions().samples == 1
    (per_ir,) = am._ctx.memo["sensitivity-fisher"].values()
    _, found = per_ir
    assert [key[2] for key in found] == [1]  # one Fisher, one sample per batch
    for name, layer in taylor.layers.items():
        trace = hessian.layers[name].extra["hessian_trace"]
        assert layer.extra["fisher_trace"] == pytest.approx(trace)
