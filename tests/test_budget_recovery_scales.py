"""The search's recovery of a precision-only candidate trains the quantized weights' float
grids too (``distill{scales=true}`` after ``quantize``; issue 17, docs/budget.md): the codes
and bytes stay those of the candidate, the fp16 scales / minimums move, the drop on the
held-out batches falls, and the manifest entry says what trained. Real tiny HF Llama
(``tests.test_distill:tiny_llama``), the search API, one torch thread.

Calibration tokens come from 4 token ids (as in ``tests/test_budget_distill.py``): with the
whole vocabulary a tiny random model only memorises its training batches."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from slimc.jobs import single_threaded

MAX_DROP = 1e-6  # nothing lossy meets it: the search must try distillation


@pytest.fixture(autouse=True)
def one_thread():
    with single_threaded():
        yield


def _search(formats: tuple[str, ...]):
    from slimc.capture import capture, load_model
    from slimc.loaders.base import parse_overrides
    from slimc.passmanager import AnalysisManager, PassContext, PassManager
    from slimc.plugins import get_registry
    from slimc.search.search import Search, proxy_scorer
    from slimc.search.space import Techniques

    registry = get_registry()
    ir, example = capture(load_model("tests.test_distill:tiny_llama", parse_overrides([]),
                                     registry))
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(8):
        ids = torch.randint(3, 7, example[0].shape, generator=gen)
        batches.append([ids if n == "input_ids" else torch.ones_like(ids)
                        for n in ir.input_names])
    ctx = PassContext(example_inputs=example)
    ctx.calibration_batches = batches
    ctx.analyses = AnalysisManager(ir, ctx, PassManager(registry.passes).lookup)
    techniques = replace(Techniques.for_context("precision", ctx), formats=formats)
    return Search(ir, ctx, registry, techniques, proxy_scorer(ir, ctx), None)


def _grids(ir) -> dict[str, torch.Tensor]:
    from passes.distill.distill import grid_operand

    return {n.name: ir.get_weight(n).clone() for n in ir.nodes("placeholder")
            if grid_operand(n)}


def test_precision_only_recovery_trains_the_grids_and_keeps_the_bytes(monkeypatch):
    from slimc.search import recovery
    from slimc.search.budget import parse_budget

    monkeypatch.setattr(recovery, "DISTILL_MAX_EPOCHS", 5)  # 30 steps: enough to move
    search = _search(("int3-g32",))
    budget = parse_budget("size=0.2")
    cand, _ = search.fit(budget, MAX_DROP)
    assert cand is None  # int3 loses more than MAX_DROP
    closest = min(search.measured, key=lambda c: c.drop)
    assert "lowrank" not in dict(closest.items) and "prune" not in dict(closest.items)

    # what the search writes: distill after quantize, with the grids
    items, at = recovery.with_distill(closest.items, {"steps": 40, "lr": 1e-3})
    assert [n for n, _ in items[:at]] == ["quantize"] and items[at][1]["scales"] is True
    plain, _ = recovery.with_distill(closest.items, {"steps": 40}, scales=False)
    assert "scales" not in dict(plain)["distill"]

    scorer = recovery.proxy_scorer(search.ir, search.ctx,
                                   batches=recovery.held_out_batches(search))
    result, attempt = recovery._attempt(search, closest, scorer, MAX_DROP, 600.0, keep=True)
    assert result is not None and attempt["steps"] == 30, attempt
    assert attempt["drop_after"] < attempt["drop_before"], attempt
    assert "float grids" in attempt["trained"]
    names = [n for n, _ in result.items]
    assert names.index("quantize") < names.index("distill")
    assert dict(result.items)["distill"]["scales"] is True
    assert result.distill["where"] == "after quantize"
    assert "float grids" in result.distill["trained"]
    assert result.distill["drop_after"] < result.distill["drop_before"]
    # same bytes as the candidate it came from; every grid moved and kept its dtype
    assert result.relative["size"] == pytest.approx(closest.relative["size"], rel=1e-9)
    before_ir, _, _, _ = search._build_items(search.base(0.0), list(closest.items))
    before, after = _grids(before_ir), _grids(result.ir)
    assert before.keys() == after.keys() and before
    assert all(after[k].dtype == before[k].dtype for k in before)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) == len(before), (len(moved), len(before))
