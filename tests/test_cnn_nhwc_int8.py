"""W8A8 conv nets stay NHWC between convolutions; depthwise int8 kernels vectorised over channels.

A chain of ``slimc::conv_w8a8`` ops with ReLU6, TensorFlow-style zero pads and a residual add
between them (MobileNetV2's inverted-residual block, in miniature, with awkward channel counts
and an asymmetric pad) is built with random integer weights, power-of-two scales and integer
inputs, so the artifact has one correct output: the IR's, bit for bit (on the host and on
aarch64 under qemu). Its lowered Relax graph keeps only the two layout transposes at the graph's
edges, and every depthwise convolution runs on the NHWC channel-lane kernel with its padding
folded in (no ``pad`` kernel, no padded copy).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import slimc
from tests.w8a8_reference import W8A8Conv, assert_artifact_matches_integer_reference

#: Depthwise shapes for the channel-lane kernel: channel counts that are not a multiple of the
#: vector lanes (5, 20, 37), stride 2 on odd sizes, asymmetric padding, dilation, 5x5, 1x3.
DEPTHWISE = {
    "c20_s2_odd": (20, 20, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 20, 9, 11),
    "c37_asym": (37, 37, (3, 3), (1, 1), (0, 2, 1, 0), (1, 1), 37, 7, 6),
    "c5_dilated_5x5": (5, 5, (5, 5), (1, 2), (4, 4, 2, 3), (2, 1), 5, 10, 9),
    "c16_1x3_nopad": (16, 16, (1, 3), (1, 1), (0, 0, 0, 0), (1, 1), 16, 4, 8),
}


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(W8A8Conv(spec, (-1) ** i * (5 + 3 * i), seed=10 + i)
                                   for i, spec in enumerate(DEPTHWISE.values()))

    def forward(self, x0, x1, x2, x3):
        return tuple(conv(x) for conv, x in zip(self.convs, (x0, x1, x2, x3), strict=True))


def _inputs(specs, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(-300, 300, (2, s[0], s[7], s[8]), generator=gen).float()
                 for s in specs)


def depthwise_factory():
    return Depthwise().eval(), _inputs(DEPTHWISE.values())


class Block(nn.Module):
    """3x3 stem -> pointwise expand -> ReLU6 -> TF zero pad (asymmetric) -> depthwise ->
    ReLU6 -> pointwise project -> + residual (the stem's output) -> pointwise; 13 channels
    between the blocks, 7x9 maps."""

    def __init__(self) -> None:
        super().__init__()
        # (c, o, kernel, stride, padding, dilation, groups, h, w)
        self.stem = W8A8Conv((3, 13, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 7, 9), 1, 0)
        self.expand = W8A8Conv((13, 22, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, 7, 9), 3, 1)
        self.depthwise = W8A8Conv((22, 22, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 22, 7, 9),
                                  -4, 2)
        self.project = W8A8Conv((22, 13, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, 7, 9), 0, 3)
        self.head = W8A8Conv((13, 6, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, 7, 9), 2, 4)

    def forward(self, x):
        x = self.stem(x)
        y = F.hardtanh(self.expand(x), 0.0, 6.0)
        y = F.hardtanh(self.depthwise(F.pad(y, (1, 1, 0, 2))), 0.0, 6.0)
        return self.head(x + self.project(y))


def block_factory():
    gen = torch.Generator().manual_seed(7)
    return Block().eval(), (torch.randint(-40, 40, (1, 3, 7, 9), generator=gen).float(),)


def _compile(factory: str, target: str, out, emulate: str = "auto"):
    return slimc.compile_model(f"tests.test_cnn_nhwc_int8:{factory}", slimc.CompileOptions(
        output=out, target=target, emulate=emulate, threads=2))


def test_depthwise_channel_lanes_exact_on_host(tmp_path):
    """Awkward depthwise shapes on the channel-lane kernel: equal to the int64 reference."""
    result = _compile("depthwise_factory", "llvm", tmp_path / "dw")
    model, inputs = depthwise_factory()
    assert_artifact_matches_integer_reference(result.output, model.convs, inputs, DEPTHWISE)


def _lowered(factory: str, target: str):
    """The Relax graph after slimc's layout passes (what operator fusion then sees)."""
    import tvm
    from slimc.backends.tvm.lower import lower_to_relax
    from slimc.backends.tvm.schedules import nhwc_rewrites as rw
    from tvm import relax

    from slimc.capture import capture, load_model
    from slimc.loaders.base import parse_overrides
    from slimc.plugins import get_registry
    from slimc.targets import resolve_target

    ir, _ = capture(load_model(f"tests.test_cnn_nhwc_int8:{factory}", parse_overrides([]),
                               get_registry()))
    mod = lower_to_relax(ir, get_registry().converters, resolve_target(target).tvm_target())
    mod = tvm.transform.Sequential([
        relax.transform.CanonicalizeBindings(), rw.nhwc_rewrites, rw.sink_layout_transposes,
        rw.cancel_transposes, relax.transform.FoldConstant()])(mod)  # weights laid out
    calls: list[str] = []

    def visit(expr) -> None:
        if isinstance(expr, relax.Call):
            if getattr(expr.op, "name", "") == "relax.call_tir":
                calls.append(expr.args[0].name_hint)
            else:
                calls.append(getattr(expr.op, "name", ""))

    relax.analysis.post_order_visit(mod["main"], visit)
    return calls


@pytest.mark.parametrize(("target", "dot"), [("x86-64-v4-vnni", "vnni"), ("x86-64-v3", "avx2")])
def test_activations_stay_nhwc_between_int8_convs(target, dot):
    """Only the graph's input and output are transposed; the pad folded into the depthwise
    kernel; the depthwise conv on the channel-lane kernel, the dense ones on the dot kernel."""
    calls = _lowered("block_factory", target)
    assert calls.count("relax.permute_dims") == 2, calls
    assert not any("slimc_pad_int8" in c for c in calls), calls
    # F.pad(y, (1, 1, 0, 2)): top 0, bottom 2, left 1, right 1, read in place by the kernel
    assert sum("depthwise_nhwc" in c and "_p0_2_1_1_" in c for c in calls) == 1, calls
    assert not any("grouped" in c for c in calls), calls
    assert sum(f"linear_w8a8_{dot}" in c for c in calls) == 4, calls


@pytest.mark.parametrize("target", ["llvm", "x86-64-v3"])
def test_block_is_exact_on_host(target, tmp_path):
    """The whole block, built and verified against the IR: relative L2 exactly 0 (the host's
    kernels, and x86-64-v3's AVX2 ``vpmaddwd`` ones with int16 codes where this CPU has AVX2)."""
    from tests.w8a8_reference import runs_here

    if not runs_here(target):
        pytest.skip(f"this CPU cannot run {target} code")
    v = _compile("block_factory", target, tmp_path / "b").manifest["verification"]
    assert v["passed"] and v["relative_l2_vs_ir"] == 0.0


@pytest.mark.parametrize(("factory", "target"), [("block_factory", "arm-v8.2"),
                                               ("depthwise_factory", "arm-v8.2"),
                                               ("block_factory", "arm")])
def test_aarch64_exact_under_qemu(factory, target, tmp_path, aarch64_emulator):
    """The same graphs for Armv8.2 (128-bit vectors: 4 int32 channel lanes, ``sdot`` dense
    convs, requantization fused into them) and plain Armv8 (the generic int8 kernel, its
    epilogue fused the same way) under qemu: equal to the IR bit for bit."""
    v = _compile(factory, target, tmp_path / "a", emulate="require").manifest[
        "verification"]
    assert v["passed"] and v["ran_on"].startswith("qemu")
    assert v["relative_l2_vs_ir"] == 0.0
