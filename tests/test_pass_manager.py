"""Analyses are cached until a transform that does not preserve them runs."""

from __future__ import annotations

import torch

from slimc.capture import capture
from slimc.loaders.base import LoadedModel
from slimc.passmanager import (
    AnalysisManager,
    PassContext,
    PassInvocation,
    PassManager,
    PreservedAnalyses,
    TransformPass,
)
from slimc.plugins import get_registry
from tests.models import small_cnn


class ScaleHead(TransformPass):
    """Multiplies the classifier's weight by 2 (changes outputs, preserves nothing)."""

    name = "scale-head"

    def run(self, ir, ctx, options):
        node = next(n for n in ir.nodes("placeholder") if n.name == "p_head_weight")
        ir.set_weight(node, ir.get_weight(node) * 2)
        return PreservedAnalyses.none()


class KeepsEverything(TransformPass):
    name = "keeps-everything"
    exact = True

    def run(self, ir, ctx, options):
        return PreservedAnalyses.all()


def _ir():
    net, (image,) = small_cnn()
    return capture(LoadedModel(name="cnn", module=net, example_inputs={"image": image}))


def test_analysis_is_cached_and_invalidated_by_transforms():
    ir, inputs = _ir()
    passes = {**get_registry().passes, "scale-head": ScaleHead,
              "keeps-everything": KeepsEverything}
    ctx = PassContext(example_inputs=inputs)
    manager = PassManager(passes)
    am = AnalysisManager(ir, ctx, manager.lookup)
    ctx.analyses = am
    first = am.get("model-stats")
    assert am.get("model-stats") is first  # cached
    assert am.history == [("model-stats", True), ("model-stats", False)]

    noop = PassInvocation("keeps-everything", KeepsEverything.Options())
    records = manager.run(ir, [noop], ctx)
    assert records[0].invalidated == []
    assert am.cached("model-stats")

    scale = PassInvocation("scale-head", ScaleHead.Options())
    records = manager.run(ir, [scale], ctx)
    assert records[0].invalidated == ["model-stats"]
    assert not am.cached("model-stats")
    # The change is measured against the IR the transform was given.
    assert records[0].fidelity["relative_l2_vs_previous"] > 0.1


def test_exact_transform_that_changes_outputs_is_rejected():
    import pytest

    from slimc.errors import VerificationError

    class Liar(ScaleHead):
        name = "liar"
        exact = True

    ir, inputs = _ir()
    ctx = PassContext(example_inputs=inputs)
    manager = PassManager({**get_registry().passes, "liar": Liar})
    with pytest.raises(VerificationError, match="must preserve the model's outputs"):
        manager.run(ir, [PassInvocation("liar", Liar.Options())], ctx)


def test_ir_runs_saves_loads_and_exposes_metadata(tmp_path):
    ir, inputs = _ir()
    net, (image,) = small_cnn()
    torch.testing.assert_close(ir.run(inputs)[0], net(image))
    conv = next(n for n in ir.nodes("call_function") if "conv2d" in str(n.target))
    info = ir.node_info(conv)
    assert info.module_path == "stem" and info.shape == (2, 16, 16, 16)
    assert info.dtype == "float32"
    graph = ir.to_networkx()
    assert graph.has_edge("image", conv.name)

    ir.annotations["note"] = {"kept": [1, 2]}
    path = ir.save(tmp_path / "cnn.pt2")
    again = type(ir).load(path)
    assert again.annotations["note"] == {"kept": [1, 2]}
    assert again.input_names == ["image"]
    torch.testing.assert_close(again.run(inputs)[0], ir.run(inputs)[0])


def test_dead_code_elimination_drops_unused_weights():
    ir, inputs = _ir()
    before = ir.num_params()
    # Orphan the classifier bias: rewire the linear to use no bias.
    linear = next(n for n in ir.nodes("call_function") if "linear" in str(n.target))
    linear.args = linear.args[:2]
    ir.changed()
    ctx = PassContext(example_inputs=inputs)
    passes = get_registry().passes
    manager = PassManager(passes)
    inv = PassInvocation("eliminate-dead-code", passes["eliminate-dead-code"].Options())
    manager.run(ir, [inv], ctx)
    assert ir.num_params() == before - 10
    # The bias, plus BatchNorm's num_batches_tracked counters that inference never reads.
    assert ir.annotations["eliminate-dead-code"]["weights"] == 4
