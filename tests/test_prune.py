"""Structured pruning (issue 4): groups, removal and compilation on tiny random models.

Every case checks real properties: the pruned IR runs with unchanged output shapes, the
parameter count drops by exactly what the removed units own, and (for a representative subset,
since TVM builds take seconds each) the artifact builds and verifies against the IR.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import slimc
from slimc.capture import capture, load_model
from slimc.passmanager import PassContext, PassManager
from slimc.pipeline import parse_pipeline_text, validate
from slimc.plugins import get_registry
from tests.models import TEXT, build_hf

torch.set_num_threads(2)


# -- tiny vision models (factories usable as `tests.test_prune:resnet`) ----------------------


def _randomise_bn(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)


def resnet():
    torch.manual_seed(0)
    cfg = T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[2, 2],
                         layer_type="bottleneck", num_labels=10)
    model = T.ResNetForImageClassification(cfg).eval()
    _randomise_bn(model)
    return model, {"pixel_values": torch.randn(2, 3, 32, 32)}


def mobilenet_v2():
    torch.manual_seed(0)
    cfg = T.MobileNetV2Config(depth_multiplier=0.35, image_size=32, num_labels=10)
    model = T.MobileNetV2ForImageClassification(cfg).eval()
    _randomise_bn(model)
    return model, {"pixel_values": torch.randn(2, 3, 32, 32)}


def vit():
    torch.manual_seed(0)
    cfg = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, image_size=16, patch_size=4, num_labels=10)
    return T.ViTForImageClassification(cfg).eval(), {"pixel_values": torch.randn(2, 3, 16, 16)}


def _text(arch: str):
    model = build_hf(arch)
    model.config.use_cache = False
    ids = torch.randint(0, TEXT["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids}
    if arch == "bert":
        inputs["attention_mask"] = torch.ones_like(ids)
    return model, inputs


def llama():
    return _text("llama")


def gpt2():
    return _text("gpt2")


def bert():
    return _text("bert")


# -- helpers --------------------------------------------------------------------------------

REGISTRY = get_registry()


def prune(model: str, pipeline: str):
    """Capture ``model``, run ``pipeline``; returns what the tests check."""
    ir, inputs = capture(load_model(f"tests.test_prune:{model}"))
    ir.remove_unused_weights()  # tied weights may leave a dead duplicate placeholder
    ir.changed()
    shapes_before = [tuple(o.shape) for o in ir.run(inputs)]
    weight_shapes = {n.name: tuple(ir.get_weight(n).shape) for n in ir.nodes("placeholder")
                     if ir.placeholder_spec(n).kind.name != "USER_INPUT"}
    ctx = PassContext(example_inputs=inputs)
    manager = PassManager(REGISTRY.passes)
    manager.run(ir, validate(parse_pipeline_text("prune-groups"), REGISTRY.passes), ctx)
    analysis = ctx.analyses.get("prune-groups")
    params_before = ir.num_params()
    records = manager.run(ir, validate(parse_pipeline_text(pipeline), REGISTRY.passes), ctx)
    shapes_after = [tuple(o.shape) for o in ir.run(inputs)]
    return dict(ir=ir, analysis=analysis, weight_shapes=weight_shapes, record=records[-1],
                params_before=params_before, shapes_before=shapes_before,
                shapes_after=shapes_after, inputs=inputs)


def expected_removed(result: dict, kinds: set[str]) -> int:
    """Scalars owned by the units the pass says it removed from groups of ``kinds``."""
    annotation = result["ir"].annotations["prune"]
    by_index = {g["index"]: g for g in annotation["groups"]}
    total = 0
    for g in result["analysis"].groups:
        if g.kind not in kinds:
            continue
        plan = by_index[g.index]
        total += (plan["units"] - plan["kept"]) * g.params_per_unit(result["weight_shapes"])
    return total


def qwen2():
    return _text("qwen2")


def mistral():
    return _text("mistral")


def gpt_neox():
    return _text("gpt_neox")


def phi():
    return _text("phi")


CHANNEL_AND_HEAD = {"mlp-channel", "conv-filter", "attention-head", "kv-group"}

#: model -> group kinds the analysis must find.
ARCHS = {
    "llama": {"mlp-channel", "kv-group", "residual"},
    "qwen2": {"mlp-channel", "kv-group", "residual"},
    "mistral": {"mlp-channel", "kv-group", "residual"},
    "gpt2": {"mlp-channel", "attention-head", "residual"},
    "bert": {"mlp-channel", "attention-head"},
    "gpt_neox": {"mlp-channel", "attention-head", "residual"},
    "phi": {"mlp-channel", "attention-head", "residual"},
    "vit": {"mlp-channel", "attention-head", "residual"},
    "resnet": {"conv-filter"},
    "mobilenet_v2": {"conv-filter"},
}


@pytest.mark.parametrize("model", sorted(ARCHS))
def test_prune_half_of_prunable_units(model):
    result = prune(model, "prune{ratio=0.5,granularity=auto}")
    kinds = {g.kind for g in result["analysis"].groups}
    assert ARCHS[model] <= kinds
    assert result["shapes_after"] == result["shapes_before"]
    removed = result["params_before"] - result["ir"].num_params()
    assert removed == expected_removed(result, CHANNEL_AND_HEAD) > 0
    annotation = result["ir"].annotations["prune"]
    for g in annotation["groups"]:  # about half of every group is gone
        assert g["kept"] <= g["units"] - g["units"] // 2 + 8
    assert result["record"].fidelity["relative_l2_vs_previous"] < float("inf")
