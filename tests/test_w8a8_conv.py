"""W8A8 convolutions: static int8 activations x int8 weights on the int8 dot-product kernels.

The kernels are checked *exactly*: a model made of one ``slimc::conv_w8a8`` op with random
integer weights, power-of-two scales and integer-valued inputs (ties and clipping included)
has one correct output, the integer convolution computed by numpy in int64, and the compiled
artifact must reproduce it bit for bit, on the host (VNNI where it has it), for x86-64-v3 (AVX2
``vpmaddwd``) and on aarch64 under qemu (``sdot``, and the plain-NEON generic kernel). The
instruction that did the work is found in the library's disassembly.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import slimc
from slimc.dialect import OPS
from tests.w8a8_reference import (
    W8A8Conv,
    assert_artifact_matches_integer_reference,
    integer_reference,
    make_input,
)

#: (in channels, out channels, kernel, stride, padding, dilation, groups, height, width):
#: odd and non-multiple-of-4/16 channel counts, stride 2, asymmetric padding, dilation,
#: 1x1, grouped, depthwise 3x3, 1-D.
SHAPES = {
    "odd_3x3_stride2": (3, 21, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, 11, 9),
    "pointwise": (20, 36, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, 7, 5),
    "pointwise_odd_stride2": (13, 16, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1, 9, 9),
    "asym_pad_dilated": (8, 19, (2, 3), (1, 2), (0, 1, 2, 1), (2, 1), 1, 10, 12),
    "grouped": (12, 18, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 3, 6, 7),
    "depthwise": (24, 24, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 24, 9, 10),
    "conv1d": (5, 7, (5,), (2,), (2, 1), (1,), 1, 1, 17),
}


class AllShapes(nn.Module):
    """Every case of :data:`SHAPES` side by side (one build per target), one input and one
    output each; zero points alternate in sign."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(W8A8Conv(spec, (-1) ** i * (3 + 2 * i), seed=i)
                                   for i, spec in enumerate(SHAPES.values()))

    def forward(self, x0, x1, x2, x3, x4, x5, x6) -> tuple[torch.Tensor, ...]:
        xs = (x0, x1, x2, x3, x4, x5, x6)  # named: the loader maps example inputs to names
        return tuple(conv(x) for conv, x in zip(self.convs, xs, strict=True))


def factory():
    """``tests.test_w8a8_conv:factory``: :class:`AllShapes` and its integer inputs."""
    return AllShapes().eval(), tuple(make_input(spec, seed=i)
                                     for i, spec in enumerate(SHAPES.values()))


def _compile(target: str, out, emulate: str = "auto"):
    return slimc.compile_model("tests.test_w8a8_conv:factory", slimc.CompileOptions(
        output=out, target=target, emulate=emulate, threads=2))


def test_reference_op_is_the_integer_convolution():
    """The IR's op (what artifacts are verified against) is the exact integer convolution."""
    model, inputs = factory()
    for conv, x, name in zip(model.convs, inputs, SHAPES, strict=True):
        np.testing.assert_array_equal(conv(x).numpy(), integer_reference(conv, x.numpy()),
                                      err_msg=name)


def _disassembly(library, arch: str) -> str:
    # LLVM's objdump decodes dot-product instructions only when told the extension exists.
    tool = ["objdump"] if arch == "x86" else ["llvm-objdump", "--mattr=+dotprod"]
    return subprocess.run([*tool, "-d", "--no-show-raw-insn", str(library)], check=True,
                          capture_output=True, text=True).stdout


def test_host_kernels_are_exact(tmp_path):
    """Every awkward shape, built for this host and run: equal to the int64 reference."""
    result = _compile("llvm", tmp_path / "out")
    model, inputs = factory()
    assert_artifact_matches_integer_reference(result.output, model.convs, inputs, SHAPES)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump needed")
def test_vnni_target_runs_vpdpbusd(tmp_path):
    """x86-64-v4-vnni: the dense convolutions' int8 work is ``vpdpbusd``; run and compared
    exactly with the IR when this host has VNNI (else built only)."""
    from slimc.isa import cpu_flags

    vnni = "avx512_vnni" in (cpu_flags() or set())
    result = _compile("x86-64-v4-vnni", tmp_path / "v", emulate="auto" if vnni else "skip")
    if vnni:
        assert result.manifest["verification"]["passed"]
        assert result.manifest["verification"]["relative_l2_vs_ir"] == 0.0
    assert re.search(r"\bvpdpbusd\b", _disassembly(result.output / "model.so", "x86"))


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump needed")
def test_avx2_target_runs_vpmaddwd(tmp_path):
    """x86-64-v3 (AVX2, no VNNI): every awkward shape on the ``vpmaddwd`` kernel (int16 codes,
    padding filled with the zero point's code), run and equal to the int64 reference, and the
    IR bit for bit, where this host has AVX2 (else built only)."""
    from tests.w8a8_reference import runs_here

    here = runs_here("x86-64-v3")
    result = _compile("x86-64-v3", tmp_path / "v3", emulate="auto" if here else "skip")
    if here:
        assert result.manifest["verification"]["passed"]
        assert result.manifest["verification"]["relative_l2_vs_ir"] == 0.0
        model, inputs = factory()
        assert_artifact_matches_integer_reference(result.output, model.convs, inputs, SHAPES)
    code = _disassembly(result.output / "model.so", "x86")
    assert re.search(r"\bvpmaddwd\b", code)
    assert not re.search(r"\bvpdpbusd\b|%zmm", code)


@pytest.mark.parametrize("target", ["arm-v8.2", "arm"])
def test_aarch64_kernels_are_exact_under_qemu(target, tmp_path, aarch64_emulator):
    """sdot (Armv8.2) and the plain-NEON generic kernel: the artifact run under qemu equals
    the IR's integer convolutions exactly (integer inputs, power-of-two scales)."""
    result = _compile(target, tmp_path / "a", emulate="require")
    v = result.manifest["verification"]
    assert v["passed"] and v["ran_on"].startswith("qemu")
    assert v["relative_l2_vs_ir"] == 0.0
    if shutil.which("llvm-objdump"):
        sdot = re.search(r"\bsdot\b", _disassembly(result.output / "model.so", "arm"))
        assert bool(sdot) == (target == "arm-v8.2")


def test_kernel_choice_per_convolution_kind():
    """Dense convolutions on the dot-product kernel of the target, grouped on the int path."""
    from slimc.backends.tvm.lower import lower_to_relax

    from slimc.capture import capture, load_model
    from slimc.loaders.base import parse_overrides
    from slimc.plugins import get_registry
    from slimc.targets import resolve_target

    for target, dot in (("x86-64-v4-vnni", "vnni"), ("arm-v8.2", "sdot"),
                        ("x86-64-v3", "avx2"), ("x86-64-v2", "generic")):
        ir, _ = capture(load_model("tests.test_w8a8_conv:factory", parse_overrides([]),
                                   get_registry()))
        assert sum(n.target is OPS["conv_w8a8"] for n in ir.nodes("call_function")) \
            == len(SHAPES)
        mod = lower_to_relax(ir, get_registry().converters, resolve_target(target).tvm_target())
        names = sorted(gv.name_hint for gv, _ in mod.functions_items() if "w8a8" in gv.name_hint)
        dense = [n for n in names if "grouped" not in n and "depthwise" not in n]
        # 5 dense cases (two pointwise ones share a shape-keyed kernel at most), 1 grouped,
        # 1 depthwise (NHWC, channel lanes: tests/test_cnn_nhwc_int8.py)
        assert len(dense) >= 4 and all(f"linear_w8a8_{dot}" in n for n in dense), names
        assert sum("conv_w8a8_grouped" in n for n in names) == 1, names
        assert sum("conv_w8a8_depthwise_nhwc" in n for n in names) == 1, names


# -- whole networks -------------------------------------------------------------------------

#: Regular + strided (ResNet), depthwise + pointwise (MobileNetV2), grouped (RegNet), concat
#: (DenseNet), conv classifier without batch norm (SqueezeNet), 1-D (audio).
FAMILIES = {"resnet": None, "mobilenet_v2": None, "regnet": None,
            "densenet": "tests.cnn_models:densenet", "squeezenet": "tests.cnn_models:squeezenet",
            "audio": "tests.cnn_models:audio_front_end"}


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    from tests.cnn_models import save_hf_model

    cache: dict[str, str] = {}

    def make(name: str) -> str:
        if FAMILIES[name]:
            return FAMILIES[name]
        if name not in cache:
            cache[name] = save_hf_model(name, tmp_path_factory.mktemp(name) / name)
        return cache[name]

    return make


def _capture(model: str):
    from slimc.capture import capture, load_model
    from slimc.loaders.base import parse_overrides

    vision = not model.startswith("tests.")
    return capture(load_model(model, parse_overrides(
        ["pixel_values=2x3x32x32:float32"] if vision else [])))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_convolution_gets_static_int8_activations(network, family):
    """Batch norms folded, then every convolution (regular, pointwise, grouped, depthwise,
    1-D) is a W8A8 op, and the network's outputs stay close to the float model's."""
    from slimc.passes.quantize.quantize import QuantizeOptions, quantize_ir

    from slimc.passmanager import PassContext, relative_l2

    ir, inputs = _capture(network(family))
    convs = sum(str(n.target).startswith("aten.conv") for n in ir.nodes("call_function"))
    before = ir.run(inputs)
    summary = quantize_ir(ir, PassContext(example_inputs=inputs),
                          QuantizeOptions(weights="int8", activations="int8"))
    ops = [n.target for n in ir.nodes("call_function")]
    assert ops.count(OPS["conv_w8a8"]) == convs > 0
    assert OPS["conv_int8"] not in ops
    w8a8 = [v for v in summary["per_layer"].values() if v.get("kind") == "conv"]
    assert len(w8a8) == convs and all(v["activations"] == "int8" for v in w8a8)
    assert relative_l2(before, ir.run(inputs)) < 0.05
    # int8 codes + per-output scales and per-input multipliers (fp32): under 0.29x.
    assert summary["bytes_after"] <= 0.29 * summary["bytes_before"]


def test_w8a8_cnn_artifact_matches_the_quantized_ir(network, tmp_path):
    """A real build (host kernels: VNNI where the host has it), verified by compile_model
    against the quantized IR: grouped, pointwise and strided convs together (RegNet)."""
    result = slimc.compile_model(network("regnet"), slimc.CompileOptions(
        pipeline="quantize{weights=int8,activations=int8}", output=tmp_path / "out",
        inputs=["pixel_values=2x3x32x32:float32"], threads=2))
    m = result.manifest
    assert m["verification"]["passed"] and m["verification"]["relative_l2_vs_ir"] < 1e-3
    assert 0 < m["pipeline"][0]["fidelity"]["relative_l2_vs_previous"] < 0.05


def test_gptq_and_awq_round_convolutions_better_than_round_to_nearest():
    """GPTQ on a convolution's im2col Hessian (dense and grouped) beats round-to-nearest on
    the output, for int4 and int8; AWQ (dense convolutions) is never worse."""
    from slimc.passes.quantize.quantize import QuantizeOptions, quantize_ir

    from slimc.capture import capture
    from slimc.loaders.base import LoadedModel
    from slimc.passmanager import PassContext

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1, groups=4)).eval()
    x = torch.randn(8, 16, 12, 12)
    x[:, 3] *= 6.0  # uneven input channels: where GPTQ's error feedback pays
    with torch.no_grad():
        reference = model(x)
    errors = {}
    for fmt, group in (("int4", 16), ("int8", 128)):
        for method in ("rtn", "gptq", "awq"):
            ir, inputs = capture(LoadedModel("convs", module=model, example_inputs={"x": x}))
            summary = quantize_ir(ir, PassContext(example_inputs=inputs), QuantizeOptions(
                weights=fmt, method=method, group_size=group))
            out = ir.run(inputs)[0].detach()
            errors[fmt, method] = float((out - reference).pow(2).mean()
                                        / reference.pow(2).mean())
            methods = [v["method"] for v in summary["per_layer"].values()]
            # AWQ scales input channels of dense convolutions; the grouped one says why not
            assert methods == ([method] * 2 if method != "awq" else ["awq", "rtn"])
    assert errors["int4", "gptq"] < 0.8 * errors["int4", "rtn"]
    assert errors["int8", "gptq"] < errors["int8", "rtn"]
    assert errors["int4", "awq"] <= errors["int4", "rtn"]
