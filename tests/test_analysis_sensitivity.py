"""Sensitivity criteria on tiny real models: shapes, monotone curves, estimator correctness."""

from __future__ import annotations

import pytest
import torch
from slimc.passes.analysis.criteria.candidates import prune_channels, quantize_rtn, truncate_rank
from slimc.passes.analysis.criteria.execution import ActivationRecorder
from slimc.passes.analysis.criteria.hessian import hutchinson_traces
from slimc.passes.analysis.layers import weight_layers

from slimc.capture import capture
from slimc.errors import UsageError
from slimc.loaders.base import LoadedModel
from tests.models import analysis_manager

torch.set_num_threads(2)
CRITERIA = ("magnitude", "activation", "taylor", "hessian", "perturbation")






def test_compressions_do_what_they_say():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    assert quantize_rtn(w, 4)[0].unique().numel() <= 15
    assert (quantize_rtn(w, 8) - w).abs().max() < (quantize_rtn(w, 2) - w).abs().max()
    pruned = prune_channels(w, 0.5, axis=0)
    assert int((pruned.abs().sum(1) == 0).sum()) == 8
    assert torch.linalg.matrix_rank(truncate_rank(w, 0.25)) == 4


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_scores_every_layer_with_a_curve(captured_llama, criterion):
    ir, batches = captured_llama
    am = analysis_manager(ir, batches)
    result = am.get("sensitivity", criterion=criterion, bits=(8, 2), keep_ratios=(0.5,),
                    rank_ratios=(0.25,), reference="q8", groups=False)
    layers = weight_layers(ir)
    assert set(result.layers) == {layer.name for layer in layers} and len(layers) == 16
    for layer in result.layers.values():
        assert set(layer.curve) == {"q8", "q2", "keep0.5", "rank0.25"}
        assert all(v >= 0 for v in layer.curve.values())
        assert layer.curve["q2"] >= layer.curve["q8"]  # fewer bits hurt more
    hurt_more = sum(v.curve["q2"] > v.curve["q8"] for v in result.layers.values())
    assert hurt_more >= len(layers) - 2  # (hessian: a trace below its noise is clipped to 0)
    assert am.get("sensitivity-" + criterion, bits=(8, 2), keep_ratios=(0.5,),
                  rank_ratios=(0.25,), reference="q8", groups=False) is result  # cached


def test_unknown_criterion_is_a_usage_error(captured_llama):
    ir, batches = captured_llama
    with pytest.raises(UsageError, match="Unknown sensitivity criterion 'fisherman'.*magnitude"):
        analysis_manager(ir, batches).get("sensitivity", criterion="fisherman")


def test_activation_recorder_matches_module_hooks():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 5)).eval()
    image = torch.randn(2, 3, 8, 8)  # conv 3x3 -> 4 x 6 x 6
    seen: dict[str, torch.Tensor] = {}

    def keep_input(name):
        def hook(module, args, output) -> None:  # returns None: the output stays as it is
            seen[name] = args[0]
        return hook

    hooks = [net[0].register_forward_hook(keep_input("conv")),
             net[3].register_forward_hook(keep_input("linear"))]
    with torch.no_grad():
        net(image)
    for hook in hooks:
        hook.remove()
    ir, inputs = capture(LoadedModel(name="net", module=net, example_inputs={"image": image}))
    layers = {layer.name: layer.ops[0].name for layer in weight_layers(ir)}
    recorder = ActivationRecorder(ir, [n for n in ir.nodes() if n.name in layers.values()])
    recorder.record(inputs)
    torch.testing.assert_close(recorder.sq_norms[layers["3"]],
                               seen["linear"].double().pow(2).sum(0))
    torch.testing.assert_close(recorder.sq_norms[layers["0"]],
                               seen["conv"].double().pow(2).sum(dim=(0, 2, 3)))
    assert recorder.tokens[layers["3"]] == 2 and recorder.tokens[layers["0"]] == 2 * 64


def test_hutchinson_trace_matches_exact_hessian_trace():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x = torch.randn(6, 4)
    ir, inputs = capture(LoadedModel(name="mlp", module=net, example_inputs={"x": x}))
    w0 = next(layer.weight.name for layer in weight_layers(ir) if layer.name == "0")
    estimate = hutchinson_traces(ir, inputs, [w0], 4000, torch.Generator().manual_seed(1))[w0]

    def loss(flat):
        out = torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(
            x, flat.view(5, 4), net[0].bias)), net[2].weight, net[2].bias)
        return 0.5 * (out - net(x).detach()).pow(2).sum()

    exact = torch.autograd.functional.hessian(loss, net[0].weight.detach().reshape(-1)).trace()
    assert estimate == pytest.approx(float(exact), rel=0.1)


def test_groups_heads_neurons_and_blocks_get_damage_curves(captured_llama):
    ir, batches = captured_llama
    am = analysis_manager(ir, batches)
    kinds = {g.kind for g in am.get("prune-groups").groups}
    result = am.get("sensitivity", criterion="perturbation", bits=(4,), keep_ratios=(),
                    rank_ratios=(), group_keep_ratios=(0.75, 0.5, 0.25))
    assert result.groups_error is None
    groups = result.groups
    assert {g.kind for g in groups.values()} >= ({"mlp-channel", "block"} | (
        kinds & {"attention-head", "kv-group"}))
    mlp = groups["model.layers.0.mlp:mlp-channel"]
    assert mlp.units == 64 and set(mlp.curve) == {"keep0.75", "keep0.5", "keep0.25"}
    assert len(mlp.removed["keep0.25"]) == 48 and len(mlp.removed["keep0.75"]) == 16
    assert mlp.curve["keep0.25"] >= mlp.curve["keep0.75"] > 0  # a curve, more removed hurts more
    block = groups["model.layers.1:block"]
    assert set(block.curve) == {"keep0"} and block.curve["keep0"] > 0
    assert "groups" in result.to_json() and result.to_json()["groups"][block.name]["params"] > 0
    magnitude = am.get("sensitivity", criterion="magnitude", bits=(4,), keep_ratios=(),
                       rank_ratios=())
    assert set(magnitude.groups) == set(groups)
