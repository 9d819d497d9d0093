"""``lowrank{sequential=true}``: staged calibration (:class:`slimc.observe.StagedRun`) and the
closed-form refit of each layer to the dense model's outputs (issue 13)."""

from __future__ import annotations

import torch

from slimc.capture import capture, load_model
from slimc.observe import StagedRun, observe
from slimc.passmanager import PassContext, PassManager, relative_l2
from slimc.pipeline import parse_pipeline_text, validate
from slimc.plugins import get_registry

torch.set_num_threads(2)
REGISTRY = get_registry()
aten = torch.ops.aten


def _ir(model: str):
    ir, inputs = capture(load_model(model))
    ir.remove_unused_weights()
    ir.changed()
    return ir, inputs


def test_staged_run_yields_what_a_full_run_observes():
    ir, inputs = _ir("tests.test_lowrank_share:medium_llama")
    ids = [[torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(s))]
           for s in range(2)]
    linears = [n for n in ir.nodes("call_function") if n.target is aten.linear.default]
    wanted = [linears[0].args[0], linears[5].args[0], linears[-1].args[0]]
    seen: dict[str, list] = {}
    observe(ir, ids, {n: lambda n, args, out: seen.setdefault(n.name, []).append(out)
                      for n in wanted})
    staged = StagedRun(ir, ids)
    for node in wanted:
        got = staged.advance_to(node)
        assert all(torch.equal(a, b) for a, b in zip(got, seen[node.name], strict=True))


def _batches(seeds, dim: int = 192) -> list[list[torch.Tensor]]:
    """Inputs whose channel variances decay geometrically (a spectrum like real activations':
    every direction present, few carrying most of the energy)."""
    decay = 0.97 ** torch.arange(float(dim))
    return [[torch.randn(16, dim, generator=torch.Generator().manual_seed(s)) * decay]
            for s in seeds]


def test_sequential_refit_beats_one_shot_whitening_through_depth():
    errors, summaries = {}, {}
    held_out = _batches([99])[0]
    for sequential in (False, True):
        ir, inputs = _ir("tests.test_lowrank_share:stack")
        reference = ir.run(held_out)
        ctx = PassContext(example_inputs=inputs, calibration_batches=_batches(range(8)))
        pipeline = f"lowrank{{method=whiten,ratio=0.6,round_to=4,sequential={sequential}}}"
        PassManager(REGISTRY.passes).run(ir, validate(parse_pipeline_text(pipeline),
                                                      REGISTRY.passes), ctx)
        errors[sequential] = relative_l2(reference, ir.run(held_out))
        summaries[sequential] = ir.annotations["lowrank"]
    # the same ranks and parameter count, a smaller error on held-out inputs
    assert summaries[True]["params_after"] == summaries[False]["params_after"]
    assert {v["rank"] for v in summaries[True]["per_layer"].values()} == \
        {v["rank"] for v in summaries[False]["per_layer"].values()}
    assert all(v["method"] == "whiten+sequential"
               for v in summaries[True]["per_layer"].values())
    assert errors[True] < errors[False]


def test_sequential_on_a_llama_with_tied_embedding_factors(hf_dir):
    ir, inputs = _ir("tests.test_lowrank_share:medium_llama")
    reference = ir.run(inputs)
    ctx = PassContext(example_inputs=inputs, calibration_batches=[])
    PassManager(REGISTRY.passes).run(ir, validate(parse_pipeline_text(
        "lowrank{ratio=0.2,sequential=true,round_to=8}"), REGISTRY.passes), ctx)
    ann = ir.annotations["lowrank"]
    assert ann["factorized"] == 15 and abs(1 - ann["params_after"] / ann["params_before"]
                                           - 0.2) < 0.03
    assert relative_l2(reference, ir.run(inputs)) < 0.5
