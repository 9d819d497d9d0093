"""Compile-speed round 3 (issue 16) keeps results identical: calibration forwards and
noise-floor seeds one per core (``slimc.jobs.map_single_threaded``), the IR's example outputs
shared between the compiler and the pass manager, one SVD per weight for every criterion.

Each change computes the same thing another way, so each test compares the new path with the
old one (or with the same call on one core) on real HF models built in the test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from slimc.passes.analysis.criteria.candidates import Setting, svd_factors, truncate_rank
from slimc.passes.quantize import calib
from slimc.passes.quantize.layers import plan
from slimc.passes.quantize.quantize import QuantizeOptions, quantize_ir

from slimc.capture import capture, load_model
from slimc.dialect import _JITTER, rounding_noise_floor
from slimc.jobs import map_single_threaded, pool_workers
from slimc.loaders.base import parse_overrides
from slimc.passmanager import PassContext, PassManager
from slimc.pipeline import parse_pipeline_text, validate
from slimc.plugins import get_registry


def _ir(path: str):
    loaded = load_model(path, parse_overrides(["input_ids=1x16"]), get_registry())
    return capture(loaded)


def _batches(inputs, count: int) -> list[list[torch.Tensor]]:
    out = []
    for seed in range(count):
        g = torch.Generator().manual_seed(seed)
        out.append([torch.randint(0, 100, t.shape, generator=g, dtype=t.dtype)
                    if t.dtype == torch.int64 and t.max() > 1 else t for t in inputs])
    return out


def test_map_single_threaded_keeps_order_and_restores_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = map_single_threaded(lambda i: (i, torch.get_num_threads()), list(range(5)))
        assert [i for i, _ in seen] == list(range(5))
        assert {threads for _, threads in seen} == {1}  # each item single-threaded
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_pool_workers_keep_one_worker_per_core_on_one_intra_op_thread():
    """Under ``pool_workers(2)`` (the budget search after its thread probe chose one torch
    thread, issue 18) the items still run on two worker threads, each single-threaded, and
    one thread's floor does not leak into another thread's pools."""
    import threading

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def item(i):
            return threading.get_ident(), torch.get_num_threads()

        inline = map_single_threaded(item, list(range(4)))
        assert {ident for ident, _ in inline} == {threading.get_ident()}
        with pool_workers(2):
            seen = map_single_threaded(lambda i: (item(i), map_single_threaded(
                lambda j: threading.get_ident(), [0, 1])), list(range(8)))
            assert torch.get_num_threads() == 1
        idents = {ident for (ident, _), _ in seen}
        assert threading.get_ident() not in idents and 1 <= len(idents) <= 2
        assert {threads for (_, threads), _ in seen} == {1}
        # inside a worker the floor does not apply: its own pool runs inline
        assert all(set(inner) == {ident} for (ident, _), inner in seen)
        assert map_single_threaded(item, [0, 1])[0][0] == threading.get_ident()
    finally:
        torch.set_num_threads(before)


def test_search_thread_probe_keeps_the_damage_tables_workers():
    """When the search's probe picks one torch thread (a forward that is slower on two, as on
    a busy host), its pools still get one worker per core: the 320M decoder's damage table
    ran inline, at twice its wall time, when it did not (issue 18)."""
    import threading
    import time

    from slimc.search.driver import _fastest_torch_threads

    class SlowOnTwoThreads:  # the probe times ir.run(batch)
        def run(self, batch):
            time.sleep(0.02 if torch.get_num_threads() > 1 else 0.0)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with _fastest_torch_threads(SlowOnTwoThreads(), []):
            assert torch.get_num_threads() == 1
            idents = map_single_threaded(lambda i: (time.sleep(0.01), threading.get_ident())[1],
                                         list(range(6)))
        assert threading.get_ident() not in set(idents)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_parallel_statistics_equal_the_sequential_ones(hf_dir):
    """Without Hessians the batches run one per core; with them, one after another. Both give
    the same per-layer extremes, sums and row samples."""
    ir, inputs = _ir(hf_dir("bert"))
    layers, _ = plan(ir, embeddings=False)
    batches = _batches(inputs, 5)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel = calib.collect(ir, layers, batches, hessian=False, sample_rows=40)
        sequential = calib.collect(ir, layers, batches, hessian=True, sample_rows=40)
    finally:
        torch.set_num_threads(before)
    assert parallel.keys() == sequential.keys() and len(parallel) == len(layers)
    for name, a in parallel.items():
        b = sequential[name]
        assert a.rows == b.rows and a.rows in (5, 5 * 16)  # the pooler sees [CLS] only
        assert torch.equal(a.min, b.min) and torch.equal(a.max, b.max)
        torch.testing.assert_close(a.abs_sum, b.abs_sum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.sq_sum, b.sq_sum, rtol=1e-5, atol=1e-6)
        assert a.hessian is None and b.hessian is not None
        # 16 rows a batch, 40 wanted: 16 + 16 + 8 rows, the same ones (the pooler: 5 x 1)
        assert [s.shape[0] for s in a.sample] == [s.shape[0] for s in b.sample] == (
            [16, 16, 8] if a.rows == 80 else [1] * 5)
        torch.testing.assert_close(a.sample_rows(), b.sample_rows(), rtol=1e-5, atol=1e-6)


def test_noise_floor_seeds_in_parallel_give_the_sequential_floor(hf_dir, monkeypatch):
    from slimc import dialect

    # A tiny model rarely has a code within 1e-6 of a rounding boundary: jitter more.
    monkeypatch.setattr(dialect, "KERNEL_FLOAT_NOISE", 1e-3)
    ir, inputs = _ir(hf_dir("bert"))
    ctx = PassContext(example_inputs=inputs, calibration_batches=_batches(inputs, 2))
    quantize_ir(ir, ctx, QuantizeOptions(weights="int8", activations="int8"))
    before = torch.get_num_threads()
    floors = {}
    try:
        for threads in (1, 2):  # one job: the seeds run inline, one after the other
            torch.set_num_threads(threads)
            floors[threads] = rounding_noise_floor(ir, inputs)
    finally:
        torch.set_num_threads(before)
    assert floors[1] is not None and floors[1] > 0.0
    assert floors[2] == pytest.approx(floors[1], rel=1e-4)
    assert _JITTER.relative == 0.0 and _JITTER.generator is None  # nothing left behind


def test_pass_manager_reuses_the_example_outputs_until_the_ir_changes(hf_dir):
    ir, inputs = _ir(hf_dir("bert"))
    registry = get_registry()
    ctx = PassContext(example_inputs=inputs)
    first = ctx.outputs_on_examples(ir)
    assert ctx.outputs_on_examples(ir) is first  # unchanged IR: not run again
    records = PassManager(registry.passes).run(
        ir, validate(parse_pipeline_text("quantize{weights=int8}"), registry.passes), ctx)
    assert records[0].fidelity["relative_l2_vs_previous"] > 0.0
    after = ctx.outputs_on_examples(ir)
    assert after is not first and ctx.example_outputs[1] == ir.version
    for cached, fresh in zip(after, ir.run(inputs), strict=True):
        assert torch.equal(cached, fresh)  # what the compiler reads is the quantized IR's


def test_one_svd_serves_every_rank_ratio():
    w = torch.randn(48, 20, dtype=torch.float32)
    factors = svd_factors(w)
    for ratio in (0.5, 0.25):
        shared = Setting("low_rank", ratio).apply(w, 0, factors)
        assert torch.equal(shared, truncate_rank(w, ratio))
        assert np.linalg.matrix_rank(shared.numpy(), tol=1e-4) == round(ratio * 20)


def test_perturbation_scores_one_per_core_equal_the_sequential_ones(hf_dir):
    from slimc.passes.analysis.criteria.perturbation import PerturbationSensitivity

    from slimc.passmanager import AnalysisManager

    ir, inputs = _ir(hf_dir("bert"))
    registry = get_registry()
    options = PerturbationSensitivity.Options(bits=(4,), keep_ratios=(0.5,), rank_ratios=(0.5,),
                                              reference="q4", group_keep_ratios=(0.5,))
    results = {}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ctx = PassContext(example_inputs=inputs, calibration_batches=_batches(inputs, 2))
            ctx.analyses = AnalysisManager(ir, ctx, PassManager(registry.passes).lookup)
            results[threads] = PerturbationSensitivity().run(ir, ctx, options)
    finally:
        torch.set_num_threads(before)
    one, two = results[1], results[2]
    assert one.layers.keys() == two.layers.keys() and len(one.layers) > 10
    for name, layer in one.layers.items():
        assert layer.curve.keys() == {"q4", "keep0.5", "rank0.5"}
        for key, value in layer.curve.items():
            assert two.layers[name].curve[key] == pytest.approx(value, rel=1e-4, abs=1e-9)
    assert one.groups.keys() == two.groups.keys() and one.groups
    for name, group in one.groups.items():
        assert group.curve == pytest.approx(two.groups[name].curve, rel=1e-4, abs=1e-9)
    assert any(v > 0 for layer in one.layers.values() for v in layer.curve.values())
