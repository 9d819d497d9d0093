"""``lowrank`` on convolutions: Tucker-2 (three real convs) and pointwise SVD (two), issue 13."""

from __future__ import annotations

import copy

import torch
from slimc.passes.lowrank import tucker

import slimc
from slimc.capture import capture, load_model
from slimc.passmanager import PassContext, PassManager, relative_l2
from slimc.pipeline import parse_pipeline_text, validate
from slimc.plugins import get_registry

torch.set_num_threads(2)
REGISTRY = get_registry()
aten = torch.ops.aten


class ConvNet(torch.nn.Module):
    """Dense 3x3 convs (one strided), a depthwise conv, a pointwise conv and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(16, 64, 3, padding=1)
        self.c2 = torch.nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.dw = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.pw = torch.nn.Conv2d(64, 128, 1)
        self.fc = torch.nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        return self.fc(x.mean((2, 3)))


def conv_net():
    torch.manual_seed(0)
    return ConvNet().eval(), (torch.randn(2, 16, 12, 12),)


def _lowrank(pipeline: str):
    model, inputs = conv_net()
    ir, ir_inputs = capture(load_model("tests.test_lowrank_conv:conv_net"))
    ir.remove_unused_weights()
    ir.changed()
    ctx = PassContext(example_inputs=ir_inputs, calibration_batches=[])
    PassManager(REGISTRY.passes).run(ir, validate(parse_pipeline_text(pipeline),
                                                  REGISTRY.passes), ctx)
    return model, inputs, ir, ir_inputs


def test_tucker2_recovers_low_multilinear_rank_and_hooi_helps():
    g = torch.Generator().manual_seed(1)
    a, _ = torch.linalg.qr(torch.randn(48, 8, generator=g))
    b, _ = torch.linalg.qr(torch.randn(32, 4, generator=g))
    w = torch.einsum("oa,ib,abhw->oihw", a, b, torch.randn(8, 4, 3, 3, generator=g))
    exact = tucker.tucker2(w, 8, 4).reconstruct()
    assert relative_l2(w, exact.float()) < 1e-6
    noisy = w + 0.3 * torch.randn(w.shape, generator=g)
    err = {s: float((tucker.tucker2(noisy, 8, 4, sweeps=s).reconstruct() - noisy).norm())
           for s in (0, 3)}
    assert err[3] <= err[0] + 1e-9


def test_convs_become_tucker2_and_pointwise_svd_exactly_as_predicted():
    model, inputs, ir, ir_inputs = _lowrank("lowrank{method=svd,ratio=0.3,round_to=8}")
    ann = ir.annotations["lowrank"]
    per = ann["per_layer"]
    assert per["c1"]["method"] == per["c2"]["method"] == "tucker2" and per["pw"]["method"] == "svd"
    assert "groups=64" in ann["skipped"]["dw"]
    removed = ann["params_before"] - ann["params_after"]
    assert removed == sum(v["params"][0] - v["params"][1] for v in per.values())
    assert abs(removed / ann["params_before"] - 0.3) < 0.05
    # three convs (1x1, the original 3x3 geometry on the core, 1x1) per Tucker layer, two per
    # pointwise, one for the depthwise conv left alone
    convs = [n for n in ir.nodes("call_function")
             if n.target in (aten.conv2d.default, aten.convolution.default)]
    assert len(convs) == 3 + 3 + 1 + 2
    # the rewritten IR computes exactly the model with each weight replaced by its factors'
    # product: the rewrite is exact, only the truncation is lossy
    approx = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("c1", "c2"):
            conv = getattr(approx, name)
            r_out, r_in = per[name]["rank"]
            conv.weight.copy_(tucker.tucker2(conv.weight, r_out, r_in).reconstruct().float())
        r = per["pw"]["rank"][0]
        u, s, vh = torch.linalg.svd(approx.pw.weight.double().reshape(128, 64))
        approx.pw.weight.copy_((u[:, :r] * s[:r] @ vh[:r]).float().reshape(128, 64, 1, 1))
        assert relative_l2(approx(*inputs), ir.run(ir_inputs)[0]) < 1e-5
        assert 0 < relative_l2(model(*inputs), ir.run(ir_inputs)[0]) < 1


def test_energy_threshold_ranks_each_channel_mode():
    _, _, ir, _ = _lowrank("lowrank{method=svd,energy=0.6,round_to=4}")
    per = ir.annotations["lowrank"]["per_layer"]
    assert {"c1", "c2"} <= set(per)
    for name in ("c1", "c2"):
        r_out, r_in = per[name]["rank"]
        assert r_out % 4 == 0 and r_in % 4 == 0 and r_out < 64


def test_small_or_grouped_convs_are_skipped_with_reasons():
    ir, inputs = capture(load_model("tests.models:small_cnn"))
    ctx = PassContext(example_inputs=inputs, calibration_batches=[])
    PassManager(REGISTRY.passes).run(ir, validate(parse_pipeline_text("lowrank{ratio=0.2}"),
                                                  REGISTRY.passes), ctx)
    skipped = ir.annotations["lowrank"]["skipped"]
    assert "groups=16" in skipped["dw"]
    assert skipped["stem"].startswith("no channel ranks")  # 3 input channels: nothing to cut
    assert skipped["pw"].startswith("no channel ranks")


def test_factorized_quantized_cnn_artifact_runs_and_is_smaller(tmp_path):
    dense = slimc.compile_model("tests.test_lowrank_conv:conv_net", slimc.CompileOptions(
        pipeline="eliminate-dead-code", output=tmp_path / "dense", threads=2)).manifest
    m = slimc.compile_model("tests.test_lowrank_conv:conv_net", slimc.CompileOptions(
        pipeline="lowrank{method=svd,ratio=0.4},quantize{weights=int8}",
        output=tmp_path / "lr", threads=2)).manifest
    assert m["verification"]["passed"]
    assert m["params_after"] < 0.65 * dense["params_after"]
    assert m["library_bytes"] < dense["library_bytes"]
