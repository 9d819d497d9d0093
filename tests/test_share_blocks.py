"""``share{blocks=true}``: adjacent layers tied to one stored tensor plus per-layer low-rank
deltas fitted on calibration data (issue 13)."""

from __future__ import annotations

import torch

import slimc
from slimc.capture import capture, load_model
from slimc.passmanager import PassContext, PassManager, relative_l2
from slimc.pipeline import parse_pipeline_text, validate
from slimc.plugins import get_registry
from tests.test_lowrank_share import Stack

torch.set_num_threads(2)
REGISTRY = get_registry()


def related_stack():
    """Four 192x192 blocks whose weights are one matrix plus a rank-4 change each (what a
    model trained with tied blocks and relaxed per-layer deltas looks like)."""
    torch.manual_seed(0)
    model = Stack(192, 4).eval()
    base = model.layers[0].fc.weight.detach().clone()
    with torch.no_grad():
        for block in model.layers:
            block.fc.weight.copy_(base + 0.05 * torch.randn(192, 4) @ torch.randn(4, 192))
    return model, (torch.randn(8, 192),)


def _batches(seed: int, n: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(32, 192, generator=g)] for _ in range(n)]


def _share(model: str, pipeline: str, calib):
    ir, inputs = capture(load_model(model))
    ir.remove_unused_weights()
    ir.changed()
    reference = ir.clone()
    ctx = PassContext(example_inputs=inputs, calibration_batches=calib)
    PassManager(REGISTRY.passes).run(ir, validate(parse_pipeline_text(pipeline),
                                                  REGISTRY.passes), ctx)
    return reference, ir


def test_tied_blocks_with_deltas_recover_related_layers():
    reference, ir = _share("tests.test_share_blocks:related_stack",
                           "share{blocks=true,ratio=0.5,group=4,round_to=8}", _batches(0, 4))
    ann = ir.annotations["share"]
    [group] = ann["tied_blocks"]
    assert len(group["layers"]) == 4 and group["delta_rank"] % 8 == 0
    dense, stored = group["params"]
    assert reference.num_params() - ir.num_params() == dense - stored
    assert abs((dense - stored) / reference.num_params() - 0.5) < 0.1
    tied = [n for n in ir.nodes("placeholder") if n.name.endswith("_tied")]
    assert len(tied) == 1 and len(tied[0].users) == 4  # one tensor read by all four layers
    # rank-4 differences fit in the fitted rank-r deltas: held-out outputs are kept
    held_out = _batches(99, 1)[0]
    assert relative_l2(reference.run(held_out), ir.run(held_out)) < 1e-3


def test_tying_unrelated_layers_is_what_the_deltas_can_fix():
    """Random (unrelated) layers: tying alone loses, larger deltas recover more of it."""
    errors = {}
    for ratio in (0.6, 0.3):
        reference, ir = _share("tests.test_lowrank_share:stack",
                               f"share{{blocks=true,ratio={ratio},group=4,round_to=8}}",
                               _batches(0, 4))
        held_out = _batches(99, 1)[0]
        errors[ratio] = relative_l2(reference.run(held_out), ir.run(held_out))
    assert errors[0.3] < errors[0.6]


def test_tied_tensor_is_stored_once_in_model_so(tmp_path):
    dense = slimc.compile_model("tests.test_share_blocks:related_stack", slimc.CompileOptions(
        pipeline="eliminate-dead-code", output=tmp_path / "dense", threads=2)).manifest
    tied = slimc.compile_model("tests.test_share_blocks:related_stack", slimc.CompileOptions(
        pipeline="share{blocks=true,ratio=0.5,group=4}", output=tmp_path / "tied",
        threads=2)).manifest
    assert tied["verification"]["passed"]
    saved = dense["weight_bytes_after"] - tied["weight_bytes_after"]
    assert saved > 0.4 * dense["weight_bytes_after"]
    # a copy of the shared 192x192 tensor per reader would put 3 x 147 KB back
    assert dense["library_bytes"] - tied["library_bytes"] > 0.9 * saved


def test_block_tying_on_a_llama_and_bad_options(cli, hf_dir):
    reference, ir = _share("tests.test_lowrank_share:medium_llama",
                           "share{blocks=true,ratio=0.1}", [])
    groups = ir.annotations["share"]["tied_blocks"]
    assert groups and all(len(g["layers"]) == 2 for g in groups)
    assert ir.num_params() < reference.num_params()
    ids = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(ir.run([ids])[0]).all()
    res = cli("compile", hf_dir("llama"), "--pipeline", "share{blocks=true,basis=true}")
    assert res.code == 2 and "choose one" in res.err
