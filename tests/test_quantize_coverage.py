"""Quantization that reaches every weight: convolutions, MoE experts, ``x @ W.T``, and a report.

Byte ratios are checked on the quantized IR for every family (fast: no TVM build), with the
outputs compared against the float model; the compiled artifacts of one CNN, Mixtral and Falcon
are built, run and compared by ``compile_model`` itself, and their constants inspected.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from slimc.backends.tvm import quantized_conv
from slimc.passes.quantize.formats import Format
from slimc.passes.quantize.quantize import QuantizeOptions, quantize_ir
from slimc.passes.quantize.rtn import pack

import slimc
from slimc.capture import capture, load_model
from slimc.layers import find_layers
from slimc.loaders.base import parse_overrides
from slimc.passmanager import PassContext, relative_l2
from tests.cnn_models import HF_VISION, save_hf_model

FACTORIES = {"densenet": "tests.cnn_models:densenet", "squeezenet": "tests.cnn_models:squeezenet",
             "audio": "tests.cnn_models:audio_front_end"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cache: dict[str, str] = {}

    def make(name: str) -> str:
        if name in FACTORIES:
            return FACTORIES[name]
        if name not in cache:
            cache[name] = save_hf_model(name, tmp_path_factory.mktemp(name) / name)
        return cache[name]

    return make


def _capture(model: str):
    vision = any(name in model for name in HF_VISION)
    overrides = parse_overrides(["pixel_values=1x3x32x32:float32"] if vision else [])
    return capture(load_model(model, overrides))


FAMILIES = ["resnet", "mobilenet_v2", "efficientnet", "regnet", "densenet", "squeezenet",
            "audio", "falcon", "mixtral"]


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_reaches_every_family(model_dir, family):
    """int8 <= 0.27x and int4 <= 0.16x of the weight bytes, outputs close to the float
    model's, and every tensor left untouched listed with its reason."""
    model = model_dir(family)
    for weights, limit, tolerance in (("int8", 0.27, 0.05), ("int4", 0.16, 0.5)):
        ir, inputs = _capture(model)
        reference = ir.run(inputs)
        summary = quantize_ir(ir, PassContext(example_inputs=inputs),
                              QuantizeOptions(weights=weights))
        ratio = summary["bytes_after"] / summary["bytes_before"]
        assert ratio <= limit, (family, weights, ratio)
        assert relative_l2(reference, ir.run(inputs)) < tolerance
        cov = summary["coverage"]
        assert cov["reached_fraction"] > 0.9, cov
        for group in cov["untouched"]:
            assert group["reason"] and group["tensors"] > 0 and group["examples"]
        # Nothing that reads a weight as a weight is left behind: only vectors remain float.
        assert not [la for la in find_layers(ir)], family
        if family in ("resnet", "mobilenet_v2", "efficientnet", "densenet", "audio"):
            kinds = {v.get("kind") for v in summary["per_layer"].values()}
            assert "conv" in kinds
        if family == "mixtral":
            experts = [v for v in summary["per_layer"].values() if v.get("kind") == "expert"]
            assert len(experts) == 4 and all(len(v["shape"]) == 3 for v in experts)


def test_layer_recognizer_roles(model_dir):
    """One recognizer: grouped/depthwise/1-D convs, experts (3-D), and a tied embedding."""
    ir, _ = _capture(model_dir("audio"))
    convs = {la.name: la for la in find_layers(ir) if la.kind == "conv"}
    assert {la.groups() for la in convs.values()} == {1, 128, 2}
    for la in convs.values():
        assert torch.equal(la.from_matrix(la.matrix(ir)), ir.get_weight(la.weight))
    ir, _ = _capture(model_dir("mixtral"))
    experts = [la for la in find_layers(ir) if la.kind == "expert"]
    assert len(experts) == 4 and all(la.complete for la in experts)
    assert experts[0].matrix(ir).shape == (4 * 256, 64)  # one row per (expert, output)


def test_falcon_is_prunable_and_quantizable(model_dir, tmp_path):
    """Falcon computes ``x @ W.T``: captured as linear ops, pruned, then quantized."""
    result = slimc.compile_model(model_dir("falcon"), slimc.CompileOptions(
        pipeline="prune{ratio=0.3},quantize{weights=int8}", output=tmp_path / "out",
        threads=2))
    manifest = json.loads((result.output / "manifest.json").read_text())
    assert manifest["params_after"] < 0.85 * manifest["params_before"]
    assert manifest["verification"]["passed"]
    summary = manifest["pipeline"][-1]["summary"]
    assert summary["coverage"]["reached_fraction"] > 0.95
    assert manifest["weight_bytes_after"] < 0.27 * manifest["weight_bytes_before"]


@pytest.mark.parametrize("family,weights", [("densenet", "int4"), ("audio", "int8"),
                                            ("mixtral", "int4")])
def test_artifacts_store_quantized_convs_and_experts(model_dir, tmp_path, family, weights):
    """The library is built, run and compared by the compiler; its report lists coverage."""
    result = slimc.compile_model(model_dir(family), slimc.CompileOptions(
        pipeline=f"quantize{{weights={weights}}}", output=tmp_path / "out", threads=2))
    manifest = json.loads((result.output / "manifest.json").read_text())
    assert manifest["verification"]["passed"]
    summary = manifest["pipeline"][0]["summary"]
    assert summary["coverage"]["reached_fraction"] > 0.9
    report = (result.output / "report.md").read_text()
    assert "## Weight coverage" in report and "quantize" in report
    limit = 0.27 if weights == "int8" else 0.16
    assert manifest["weight_bytes_after"] <= limit * manifest["weight_bytes_before"]


CONV_CASES = [  # x shape, out channels, kernel, stride, padding (before/after), dilation, groups
    ((1, 8, 9, 11), 16, (3, 3), (1, 1), [1, 1, 1, 1], (1, 1), 1),     # odd sizes, regular
    ((2, 12, 7, 7), 12, (3, 3), (2, 2), [1, 1, 1, 1], (1, 1), 12),     # depthwise, strided
    ((1, 16, 5, 6), 8, (1, 1), (1, 1), [0, 0, 0, 0], (1, 1), 1),       # pointwise
    ((1, 12, 8, 8), 6, (3, 3), (1, 1), [0, 1, 0, 1], (2, 2), 3),       # grouped, uneven pad
    ((1, 6, 20), 10, (5,), (2,), [2, 2], (1,), 2),                     # conv1d, grouped
]


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_conv_kernels_match_the_reference(kind):
    """Every case in one module, one build: the TIR kernels vs the PyTorch reference ops."""
    import tvm
    from slimc.backends.tvm.build import _pipeline
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(0)
    group = 8  # R = 27, 9, 16, 36, 15: partial and odd groups
    specs = []
    for x_shape, out, kernel, stride, pads, dilation, groups in CONV_CASES:
        weight = torch.randn(out, x_shape[1] // groups, *kernel)
        tensors = pack(weight.reshape(out, -1), Format(kind, group if kind == "int4" else 0))
        specs.append((x_shape, tensors, torch.randn(out),
                      (list(kernel), list(stride), pads, list(dilation), groups)))

    class Convs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for i, (_, tensors, bias, _geo) in enumerate(specs):
                for key, value in {**tensors, "bias": bias}.items():
                    self.register_buffer(f"{key}{i}", value)

        def forward(self, *xs):
            outs = []
            for i, (x, (_, _, _, geo)) in enumerate(zip(xs, specs, strict=True)):
                b = lambda key, i=i: getattr(self, f"{key}{i}")  # noqa: E731
                if kind == "int8":
                    outs.append(quantized_conv.conv_int8(x, b("weight"), b("scale"), b("bias"),
                                                         *geo))
                else:
                    outs.append(quantized_conv.conv_int4(
                        x, b("weight"), b("scale"), b("zero"), b("bias"), *geo, group))
            return tuple(outs)

    xs = tuple(torch.randn(s[0]) for s in specs)
    module = Convs()
    reference = module(*xs)
    mod = from_exported_program(torch.export.export(module, xs), keep_params_as_input=False,
                                custom_convert_map=quantized_conv.converters())
    target = tvm.target.Target({"kind": "llvm"})
    executable = relax.build(mod, target=target, relax_pipeline=_pipeline(target))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    outs = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in xs])
    for got, want in zip(outs, reference, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
