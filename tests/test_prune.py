"""Structured pruning (issue 4): groups, removal and compilation on tiny random models.

Every case checks real properties: the pruned IR runs with unchanged output shapes, the
parameter count drops by exactly what the removed units own, and (for a representative subset,
since TVM builds take seconds each) the artifact builds and verifies against the IR.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T

import slimc
from slimc.capture import capture, load_model
from slimc.errors import UsageError
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
    """Scalars the removal must drop, from the analysis and the per-group kept counts: a weight
    loses ``removed units x unit width`` indices along each axis a pruned group owns."""
    annotation = result["ir"].annotations["prune"]
    by_index = {g["index"]: g for g in annotation["groups"]}
    cut: dict[str, dict[int, int]] = {}
    for g in result["analysis"].groups:
        if g.kind not in kinds:
            continue
        plan = by_index[g.index]
        for (weight, axis), idx in g.units[0].slices.items():
            axes = cut.setdefault(weight, {})
            axes[axis] = axes.get(axis, 0) + (plan["units"] - plan["kept"]) * len(idx)
    total = 0
    for weight, axes in cut.items():
        shape = list(result["weight_shapes"][weight])
        before = math.prod(shape)
        for axis, n in axes.items():
            shape[axis] -= n
        total += before - math.prod(shape)
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
    "vit": {"mlp-channel", "attention-head"},
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


@pytest.mark.parametrize("model", ["llama", "gpt2", "bert", "mobilenet_v2"])
def test_pruned_artifact_builds_and_verifies(model, tmp_path):
    out = tmp_path / model
    result = slimc.compile_model(f"tests.test_prune:{model}", slimc.CompileOptions(
        pipeline="prune{ratio=0.5}", output=out, threads=2))
    manifest = result.manifest
    assert manifest["verification"]["passed"] is True
    assert manifest["params_after"] < 0.8 * manifest["params_before"]
    assert (out / "model.so").exists()


def test_gqa_prunes_whole_kv_groups():
    result = prune("llama", "prune{ratio=0.5,granularity=head}")
    kv = [g for g in result["analysis"].groups if g.kind == "kv-group"]
    assert len(kv) == 2 and all(len(g.units) == 2 for g in kv)
    weights = {n.name: result["ir"].get_weight(n) for n in result["ir"].nodes("placeholder")
               if result["ir"].placeholder_spec(n).kind.name != "USER_INPUT"}
    q = weights["p_model_layers_0_self_attn_q_proj_weight"]
    k = weights["p_model_layers_0_self_attn_k_proj_weight"]
    assert q.shape[0] == 16 and k.shape[0] == 8  # 2 of 4 query heads with 1 of 2 KV heads
    assert result["shapes_after"] == result["shapes_before"]


# -- query heads within KV groups (GQA) --------------------------------------------------------

#: 8 query heads sharing 2 KV heads (n_rep = 4), head_dim 8.
GQA8 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
            intermediate_size=64, vocab_size=128, max_position_embeddings=64)
GQA8_CLASSES = {"llama": (T.LlamaConfig, T.LlamaForCausalLM),
                "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),  # q/k/v biases
                "mistral": (T.MistralConfig, T.MistralForCausalLM)}


def _gqa8(arch: str):
    config_cls, model_cls = GQA8_CLASSES[arch]
    torch.manual_seed(0)
    config = config_cls(**GQA8)
    config.architectures = [model_cls.__name__]
    model = model_cls(config).eval()
    model.config.use_cache = False
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}


def llama_gqa8():
    return _gqa8("llama")


def qwen2_gqa8():
    return _gqa8("qwen2")


def mistral_gqa8():
    return _gqa8("mistral")


def _weights(ir) -> dict[str, torch.Tensor]:
    return {n.name: ir.get_weight(n) for n in ir.nodes("placeholder")
            if ir.placeholder_spec(n).kind.name != "USER_INPUT"}


def _kept_heads(before: torch.Tensor, after: torch.Tensor, head_dim: int) -> list[int]:
    """Which head blocks of ``before``'s rows survive in ``after`` (rows are sliced, not
    changed, without reconstruction)."""
    heads = before.reshape(-1, head_dim, before.shape[-1])
    kept = []
    for block in after.reshape(-1, head_dim, after.shape[-1]):
        kept.append(next(h for h in range(len(heads)) if torch.equal(heads[h], block)))
    return kept


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_gqa_query_heads_pruned_within_kv_groups(arch):
    """``gqa=query`` removes the same number of query heads from each KV group: q/o shrink,
    k/v stay, n_rep shrinks, and the pruned model is exactly the dense one with the removed
    heads' o_proj columns zeroed (so each kept query head still reads its own KV head)."""
    result = prune(f"{arch}_gqa8", "prune{ratio=0.5,granularity=head,gqa=query}")
    analysis, ir = result["analysis"], result["ir"]
    queries = [g for g in analysis.groups if g.kind == "query-head"]
    kv = [g for g in analysis.groups if g.kind == "kv-group"]
    assert len(queries) == 2 and all(len(g.units) == 8 for g in queries)
    assert all([len(p) for p in g.kv_groups] == [4, 4] for g in queries)
    assert len(kv) == 2 and all(len(g.units) == 2 for g in kv)
    assert result["shapes_after"] == result["shapes_before"]
    annotation = ir.annotations["prune"]
    assert {g["kind"] for g in annotation["groups"]} == {"query-head"}
    assert all(g["kept"] == 4 for g in annotation["groups"])  # 2 of 4 per KV group
    # exact parameter drop: per layer 4 query heads x head_dim 8 rows of q (+ bias) and
    # columns of o_proj, hidden 64
    per_layer = 4 * 8 * 64 * 2 + (4 * 8 if arch == "qwen2" else 0)
    removed = result["params_before"] - ir.num_params()
    assert removed == 2 * per_layer == expected_removed(result, {"query-head"})
    weights, before = _weights(ir), result["weight_shapes"]
    dense, inputs = _gqa8(arch)
    for layer in range(2):
        prefix = f"p_model_layers_{layer}_self_attn_"
        assert weights[prefix + "q_proj_weight"].shape == (32, 64)
        assert weights[prefix + "o_proj_weight"].shape == (64, 32)
        assert weights[prefix + "k_proj_weight"].shape == before[prefix + "k_proj_weight"]
        assert weights[prefix + "v_proj_weight"].shape == before[prefix + "v_proj_weight"]
        attn = dense.model.layers[layer].self_attn
        kept = _kept_heads(attn.q_proj.weight.detach(), weights[prefix + "q_proj_weight"], 8)
        assert [h // 4 for h in kept] == [0, 0, 1, 1]  # two per KV group, in order
        with torch.no_grad():
            for h in set(range(8)) - set(kept):
                attn.o_proj.weight[:, h * 8:(h + 1) * 8] = 0
    with torch.no_grad():
        want = dense(**inputs).logits
    got = ir.run(result["inputs"])[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_gqa_query_pruning_is_even_across_groups_and_keeps_one_head():
    """Even when one KV group's query heads are all weak, each group loses the same number,
    and at most n_rep - 1 (a KV group is never left without query heads)."""
    ir, inputs = capture(load_model("tests.test_prune:llama_gqa8"))
    for node in ir.nodes("placeholder"):  # KV group 0's query heads of layer 0 barely matter
        if node.name == "p_model_layers_0_self_attn_o_proj_weight":
            w = ir.get_weight(node).clone()
            w[:, :32] *= 1e-3
            ir.set_weight(node, w)
    ctx = PassContext(example_inputs=inputs)
    PassManager(REGISTRY.passes).run(ir, validate(parse_pipeline_text(
        "prune{ratio=0.9,granularity=head,gqa=query,scope=global}"), REGISTRY.passes), ctx)
    weights = _weights(ir)
    for layer in range(2):
        q = weights[f"p_model_layers_{layer}_self_attn_q_proj_weight"]
        assert q.shape[0] == 2 * 8  # 3 of 4 removed from each group: one query head each
    assert [tuple(o.shape) for o in ir.run(inputs)] == [(2, 16, 128)]


def test_gqa_uneven_query_removal_is_rejected():
    from slimc.passes.prune.prune import apply
    from slimc.passes.prune.shapes import ShapeRewriteError

    ir, inputs = capture(load_model("tests.test_prune:llama_gqa8"))
    ctx = PassContext(example_inputs=inputs)
    PassManager(REGISTRY.passes).run(ir, validate(parse_pipeline_text("prune-groups"),
                                                  REGISTRY.passes), ctx)
    result = ctx.analyses.get("prune-groups")
    group = next(g for g in result.groups if g.kind == "query-head")
    first = group.kv_groups[0]
    with pytest.raises(ShapeRewriteError, match="evenly"):
        apply(ir, result, {group.units[first[0]].root})  # one head of one group only
    kv = next(g for g in result.groups if g.kind == "kv-group")
    with pytest.raises(ShapeRewriteError, match="K/V head"):
        apply(ir, result, {kv.units[0].root})  # a K/V head without its query heads


def test_gqa_query_and_mlp_with_params_budget_and_lsq():
    result = prune("llama_gqa8", "prune{ratio=0.25,budget=params,gqa=query,round_to=8,"
                                 "reconstruct=lsq}")
    kinds = {g["kind"] for g in result["ir"].annotations["prune"]["groups"]}
    assert kinds == {"query-head", "mlp-channel"}
    kept = result["ir"].num_params() / result["params_before"]
    assert abs(kept - 0.75) < 0.05
    assert result["shapes_after"] == result["shapes_before"]


def test_gqa_query_pruned_artifact_builds_and_verifies(tmp_path):
    out = tmp_path / "gqa"
    result = slimc.compile_model("tests.test_prune:llama_gqa8", slimc.CompileOptions(
        pipeline="prune{ratio=0.5,granularity=head,gqa=query}", output=out, threads=1))
    manifest = result.manifest
    assert manifest["verification"]["passed"] is True
    # 4 of 8 query heads in each of 2 layers: q rows and o columns, 8 x 64 each, plus the
    # unused rotary `original_inv_freq` buffer (head_dim / 2) dropped as dead
    assert manifest["params_before"] - manifest["params_after"] == 2 * 4 * 8 * 64 * 2 + 4
    assert (out / "model.so").exists()


def test_residual_width_pruning_runs():
    result = prune("llama", "prune{ratio=0.5,granularity=width,round_to=8}")
    emb = result["ir"].get_weight(next(n for n in result["ir"].nodes("placeholder")
                                       if n.name == "p_model_embed_tokens_weight"))
    assert emb.shape == (128, 16)
    assert result["shapes_after"] == result["shapes_before"]


def test_block_pruning_removes_a_layer():
    result = prune("llama", "prune{ratio=0.5,granularity=block}")
    removed = result["ir"].annotations["prune"]["removed_blocks"]
    assert len(removed) == 1
    names = {n.name for n in result["ir"].nodes("placeholder")}
    layer = removed[0].replace(".", "_")
    assert not any(layer + "_" in name for name in names)
    assert result["shapes_after"] == result["shapes_before"]


@pytest.mark.parametrize("method", ["bias", "lsq"])
def test_reconstruction_reduces_error(method):
    plain = prune("llama", "prune{ratio=0.5,granularity=channel}")
    refit = prune("llama", f"prune{{ratio=0.5,granularity=channel,reconstruct={method}}}")
    err = refit["record"].fidelity["relative_l2_vs_previous"]
    assert err < plain["record"].fidelity["relative_l2_vs_previous"]
    assert refit["ir"].num_params() <= plain["ir"].num_params() + 2 * 32  # + added biases


def test_groups_are_json_annotations():
    import json

    result = prune("gpt2", "prune{ratio=0.25,granularity=channel}")
    data = result["ir"].annotations["prune-groups"]
    json.dumps(data)
    kinds = {g["kind"] for g in data["groups"]}
    assert {"mlp-channel", "attention-head"} <= kinds
    head = next(g for g in data["groups"] if g["kind"] == "attention-head")
    assert head["units"] == 4 and head["unit_width"] == 24  # q, k and v columns of c_attn


def test_round_to_and_option_validation():
    result = prune("llama", "prune{ratio=0.3,granularity=channel,round_to=16}")
    for g in result["ir"].annotations["prune"]["groups"]:
        assert g["kept"] % 16 == 0
    with pytest.raises(UsageError):
        validate(parse_pipeline_text("prune{ratio=1.5}"), REGISTRY.passes)
    with pytest.raises(UsageError):
        validate(parse_pipeline_text("prune{granularity=filters}"), REGISTRY.passes)


def test_global_scope_allocates_unevenly_and_runs():
    result = prune("llama", "prune{ratio=0.5,granularity=channel,scope=global,round_to=1}")
    groups = result["ir"].annotations["prune"]["groups"]
    assert result["ir"].annotations["prune"]["scope"] == "global"
    assert result["shapes_after"] == result["shapes_before"]
    total = sum(g["units"] for g in groups)
    removed = sum(g["units"] - g["kept"] for g in groups)
    assert removed == int(total * 0.5)  # the global cut is exact without rounding
    removed_params = result["params_before"] - result["ir"].num_params()
    assert removed_params == expected_removed(result, {"mlp-channel"}) > 0


def test_global_scope_removes_the_globally_weakest_units():
    """Scale one MLP's down projection down: under scope=global it must lose more units."""
    ir, inputs = capture(load_model("tests.test_prune:llama"))
    for node in ir.nodes("placeholder"):
        if node.name == "p_model_layers_0_mlp_down_proj_weight":
            ir.set_weight(node, ir.get_weight(node) * 1e-3)
    ctx = PassContext(example_inputs=inputs)
    PassManager(REGISTRY.passes).run(ir, validate(parse_pipeline_text(
        "prune{ratio=0.4,granularity=channel,scope=global,round_to=1,criterion=magnitude}"),
        REGISTRY.passes), ctx)
    kept = {g["module_path"]: g["kept"] for g in ir.annotations["prune"]["groups"]}
    layer0 = next(v for k, v in kept.items() if "layers.0" in k)
    layer1 = next(v for k, v in kept.items() if "layers.1" in k)
    assert layer0 < layer1
    assert [tuple(o.shape) for o in ir.run(inputs)] == [(2, 16, 128)]


@pytest.mark.parametrize("scope", ["uniform", "global"])
def test_params_budget_hits_the_parameter_fraction(scope):
    result = prune("llama", f"prune{{ratio=0.2,budget=params,scope={scope},round_to=1}}")
    kept = result["ir"].num_params() / result["params_before"]
    assert abs(kept - 0.8) < 0.03
    assert result["shapes_after"] == result["shapes_before"]
    assert 0 < result["ir"].annotations["prune"]["unit_ratio"] < 1


def test_params_after_predicts_the_removal_exactly():
    from slimc.passes.prune.prune import choose, params_after

    ir, inputs = capture(load_model("tests.test_prune:gpt2"))
    ir.remove_unused_weights()
    ir.changed()
    ctx = PassContext(example_inputs=inputs)
    manager = PassManager(REGISTRY.passes)
    ctx.analyses = None
    manager.run(ir, validate(parse_pipeline_text("prune-groups"), REGISTRY.passes), ctx)
    result = ctx.analyses.get("prune-groups")
    groups = result.prunable({"mlp-channel", "attention-head"})
    scores = {g.index: torch.arange(len(g.units), dtype=torch.float64) for g in groups}
    plan = choose(groups, scores, 0.5, "uniform", 1)
    roots = {g.units[i].root for g in groups for i in plan[g.index]}
    predicted = params_after(ir, result, roots)
    from slimc.passes.prune.prune import apply

    apply(ir, result, roots)
    assert ir.num_params() == predicted


def test_width_pruning_of_outputs_when_allowed():
    """outputs=prune lets the residual stream (and so BERT's hidden-state output) narrow."""
    kept = prune("bert", "prune{ratio=0.5,granularity=width,round_to=8}")
    assert kept["shapes_after"] == kept["shapes_before"]  # outputs pinned: nothing to prune
    narrowed = prune("bert", "prune{ratio=0.5,granularity=all,outputs=prune,round_to=8}")
    before, after = narrowed["shapes_before"][0], narrowed["shapes_after"][0]
    assert after[:-1] == before[:-1] and after[-1] == before[-1] // 2
