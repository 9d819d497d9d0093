"""Passes on a dynamic-sequence IR keep it dynamic: the cost analysis and -O2 read sizes at the
example length without pinning the program's symbol (``s53 -> 128`` made the TVM import mix a
symbolic var with 128), ``prune`` keeps the graph's ``sym_size`` entries in the views it rewrites,
and the pass manager undoes / refuses a pass that pins an input dim."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import slimc
from slimc.capture import capture, load_model
from slimc.passmanager import (
    AnalysisPass,
    DynamicDimsLost,
    NoOptions,
    PassContext,
    PassManager,
    PreservedAnalyses,
    TransformPass,
)
from slimc.pipeline import parse_pipeline_text, validate
from slimc.plugins import get_registry
from tests.models import TEXT

REGISTRY = get_registry(plugins=())


def _sequence_dim(ir) -> torch.SymInt:
    ids = ir._user_placeholders()[ir.input_names.index("input_ids")]
    return ids.meta["val"].shape[1]


def _symbolic(dim) -> bool:
    return isinstance(dim, torch.SymInt) and not dim.node.expr.is_number


def _sym_size_values_symbolic(ir) -> bool:
    sizes = [n for n in ir.nodes("call_function") if "sym_size" in str(n.target)]
    return bool(sizes) and all(_symbolic(n.meta["val"]) for n in sizes)


@pytest.fixture
def dynamic_llama(hf_dir, dynamic_default):
    ir, inputs = capture(load_model(hf_dir("llama")))
    assert _symbolic(_sequence_dim(ir)), "the test needs a dynamic sequence"
    return ir, inputs


def test_cost_analysis_leaves_the_sequence_symbolic(dynamic_llama):
    ir, inputs = dynamic_llama
    ctx = PassContext(example_inputs=inputs)
    pipeline = validate(parse_pipeline_text("cost"), REGISTRY.passes)
    PassManager(REGISTRY.passes).run(ir, pipeline, ctx)
    cost = ir.annotations["analyses"]["cost"]
    assert cost  # priced at the example length
    assert _symbolic(_sequence_dim(ir)) and _sym_size_values_symbolic(ir)


class _PinningAnalysis(AnalysisPass):
    """Reads the sequence length with ``int()`` (the bug): guards and pins the symbol."""

    name = "pinning-analysis"
    Options = NoOptions

    def run(self, ir, ctx, options):
        return int(_sequence_dim(ir)) == 7


class _PinningTransform(TransformPass):
    """Same, in a transform."""

    name = "pinning-transform"
    Options = NoOptions

    def run(self, ir, ctx, options):
        int(_sequence_dim(ir))
        return PreservedAnalyses.all()


def test_pass_manager_undoes_an_analysis_that_pins_and_refuses_a_transform(dynamic_llama):
    ir, inputs = dynamic_llama
    passes = {**REGISTRY.passes, _PinningAnalysis.name: _PinningAnalysis,
              _PinningTransform.name: _PinningTransform}
    manager = PassManager(passes)
    ctx = PassContext(example_inputs=inputs, verify=False)
    manager.run(ir, validate(parse_pipeline_text("pinning-analysis"), passes), ctx)
    assert _symbolic(_sequence_dim(ir)) and _sym_size_values_symbolic(ir)
    with pytest.raises(DynamicDimsLost, match="pinning-transform.*input_ids\\[1\\]"):
        manager.run(ir, validate(parse_pipeline_text("pinning-transform"), passes), ctx)
    assert _symbolic(_sequence_dim(ir))  # restored for whoever looks at the IR next


def test_prune_keeps_the_sequence_symbolic(dynamic_llama):
    ir, inputs = dynamic_llama
    ctx = PassContext(example_inputs=inputs)
    before = ir.num_params()
    PassManager(REGISTRY.passes).run(
        ir, validate(parse_pipeline_text("prune{ratio=0.3}"), REGISTRY.passes), ctx)
    assert ir.num_params() < before
    assert _symbolic(_sequence_dim(ir)) and _sym_size_values_symbolic(ir)
    views = [n for n in ir.nodes("call_function") if "view" in str(n.target)
             and any(isinstance(s, torch.fx.Node) for s in n.args[1])]
    assert views  # the head split still reads the graph's sequence length


def _run_at_lengths(ir, compiled, lengths=(5, 23)):
    generator = torch.Generator().manual_seed(4)
    for length in lengths:
        ids = torch.randint(0, TEXT["vocab_size"], (1, length), generator=generator)
        mask = torch.ones(1, length, dtype=torch.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        want = ir.run([feeds[n] for n in ir.input_names])[0].detach().numpy()
        got = compiled(**{n: feeds[n] for n in ir.input_names})
        got = got[next(iter(got))] if isinstance(got, dict) else got
        assert got.shape == want.shape and got.shape[1] == length
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("arch,how", [("llama", "prune"), ("qwen2", "O2")])
def test_dynamic_sequence_compiles_and_runs_at_two_lengths(arch, how, hf_dir, dynamic_default,
                                                            tmp_path):
    from slimc.ir import IR

    options = dict(output=tmp_path / "out", target="x86", threads=1, cache=False,
                   save_ir=True)
    if how == "prune":
        options["pipeline"] = "prune{ratio=0.3}"
    else:
        options["opt_level"] = 2
    result = slimc.compile_model(hf_dir(arch), slimc.CompileOptions(**options))
    manifest = result.manifest
    dims = {i["name"]: i.get("dims") for i in manifest["inputs"]}
    assert isinstance(dims["input_ids"][1], dict), dims  # still dynamic
    assert manifest["verification"]["passed"]
    assert len(manifest["verification"]["shapes"]) >= 2  # verified at several lengths
    if how == "prune":
        assert manifest["params_after"] < manifest["params_before"]
    ir = IR.load(result.output / "ir.pt2")
    _run_at_lengths(ir, slimc.load(result.output))
