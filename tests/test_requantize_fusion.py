"""Requantization fused into the int8 kernels (``schedules.requantize_fusion``).

Between two W8A8 convolutions, ``conv -> ReLU6 -> quantize`` becomes one kernel that writes
the next layer's int8 codes. What is checked here: which kernels of a MobileNetV2-style block
take their consumer's chain (single-use chains ending in an 8-bit ``astype``; not the stem,
whose output also feeds the residual add, nor the projection, followed by that add), and that
an epilogue with every op kind (swapped operands, per-channel vectors, a crop of padded
channels) computes exactly what the same float32 ops compute in numpy. The fused block's
bit-exactness on the host and under qemu is ``tests/test_cnn_nhwc_int8.py``'s.
"""

from __future__ import annotations

import re

import numpy as np
import pytest


def _kernels_after_fusion(factory: str, target_name: str = "x86-64-v4-vnni") -> dict[str, str]:
    """``{kernel name: output dtype}`` of the block's ``call_tir``s after the fusion pass, for
    a named target (not the host: the codes' signedness follows the target's dot kernel)."""
    import tvm
    from slimc.backends.tvm.lower import lower_to_relax
    from slimc.backends.tvm.schedules import nhwc_rewrites as rw
    from slimc.backends.tvm.schedules.requantize_fusion import fuse_requantize
    from tvm import relax

    from slimc.capture import capture, load_model
    from slimc.loaders.base import parse_overrides
    from slimc.plugins import get_registry
    from slimc.targets import resolve_target

    ir, _ = capture(load_model(factory, parse_overrides([]), get_registry()))
    target = resolve_target(target_name).tvm_target()
    with target:
        mod = lower_to_relax(ir, get_registry().converters, target)
        mod = tvm.transform.Sequential([
            relax.transform.CanonicalizeBindings(), rw.nhwc_rewrites, rw.sink_layout_transposes,
            rw.cancel_transposes, relax.transform.CanonicalizeBindings(), fuse_requantize])(mod)
    kernels: dict[str, str] = {}

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir":
            kernels[expr.args[0].name_hint] = str(expr.ty.dtype)

    relax.analysis.post_order_visit(mod["main"], visit)
    return kernels


@pytest.mark.parametrize(("target_name", "dot", "project_codes"), [
    ("x86-64-v4-vnni", "vnni", "uint8"),  # vpdpbusd multiplies unsigned activations
    ("x86-64-v3", "avx2", "int16"),  # vpmaddwd reads int16 codes: written as such
    ("x86-64-v2", "generic", "int8"),
    ("arm-v8.2", "sdot", "int8"),
])
def test_single_use_chains_fuse_into_their_producers(target_name, dot, project_codes):
    kernels = _kernels_after_fusion("tests.test_cnn_nhwc_int8:block_factory", target_name)
    fused = {k: v for k, v in kernels.items() if re.search(r"_e[0-9a-f]{10}$", k)}
    # expand (1x1, 13 -> 22, crop of padded channels and rows) -> ReLU6 -> depthwise codes;
    # depthwise -> ReLU6 -> project codes (in the signedness the project kernel reads).
    assert len(fused) == 2, kernels
    assert any(k.startswith(f"slimc_linear_w8a8_{dot}_") and v == "int8"
               for k, v in fused.items()), kernels
    assert any(k.startswith("slimc_conv_w8a8_depthwise_nhwc") and v == project_codes
               for k, v in fused.items()), kernels
    # stem (feeds the residual add too), project (+ residual) and head (the output): float32
    plain = [k for k, v in kernels.items() if k.startswith("slimc_linear_w8a8_") and k not in fused]
    assert len(plain) == 3 and all(kernels[k] == "float32" for k in plain), kernels


@pytest.mark.parametrize("target_name", ["llvm", "x86-64-v3", "x86-64-v2"])
def test_epilogue_ops_match_numpy_float32(target_name):
    """Every op kind an epilogue holds, on the dot kernel of the target (the host's: VNNI,
    else AVX2 or generic; x86-64-v3: AVX2; x86-64-v2: generic): the fused output equals the
    same float32 ops in numpy, bit for bit."""
    import tvm
    from slimc.backends.tvm import int8_kernels as ik

    from slimc.targets import resolve_target
    from tests.w8a8_reference import runs_here

    if not runs_here(target_name):
        pytest.skip(f"this CPU cannot run {target_name} code")
    target = resolve_target(target_name).tvm_target()
    kind = ik.kernel_kind(target)
    m, k, n = 8, 12, 16
    rng = np.random.default_rng(0)
    shift = rng.integers(-2, 3, n).astype(np.float32)
    mult = (2.0 ** rng.integers(-1, 2, n)).astype(np.float32)
    epilogue = (("subtract", "vector", 0, True), ("maximum", "scalar", -40.0, False),
                ("multiply", "vector", 1, False), ("divide", "scalar", 4.0, False),
                ("round",), ("add", "scalar", 3.0, True), ("minimum", "scalar", 127.0, False),
                ("maximum", "scalar", -128.0, False), ("astype", "int8"))
    codes = rng.integers(-128 if kind != "vnni" else 0, 128, (m, k))
    weight = rng.integers(-127, 128, (n, k)).astype(np.int8)
    scale = (2.0 ** -rng.integers(4, 8, n)).astype(np.float32)
    bias = rng.integers(-3, 4, n).astype(np.float32)
    comp = rng.integers(-50, 50, n).astype(np.int32)
    if kind == "generic":
        t = 4
        func = ik.generic_kernel(m, k, n, t, epilogue=epilogue)
        packed = weight.reshape(n // t, t, k).transpose(0, 2, 1)
        a = codes.astype(np.int8)
    else:
        lanes, g = ik.lanes(kind), ik.group(kind)
        func = ik.dot_kernel(kind, m, k, n, epilogue=epilogue)
        packed = weight.reshape(n // lanes, lanes, k // g, g).transpose(0, 2, 1, 3)
        a = codes.astype(ik.activation_dtype(kind))
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((m, n), np.int8), dev)
    args = [np.ascontiguousarray(x) for x in (a, packed, comp, scale, bias, shift, mult)]
    lib[str(func.attrs["global_symbol"])](*[tvm.runtime.tensor(x, dev) for x in args], out)

    acc = codes.astype(np.int64) @ weight.astype(np.int64).T
    y = (acc - comp).astype(np.float32) * scale + bias
    y = np.maximum(shift - y, np.float32(-40.0)) * mult / np.float32(4.0)
    y = np.clip(np.float32(3.0) + np.round(y), -128, 127).astype(np.int8)
    np.testing.assert_array_equal(out.numpy(), y)


def test_hf_mobilenet_v2_w8a8_artifact_runs_fused_kernels(tmp_path):
    """A real (tiny, random) Hugging Face MobileNetV2 in W8A8, built for this host: TF "same"
    pads, ReLU6, inverted residuals. The library holds conv kernels with fused requantization
    (their names carry the epilogue suffix), and compile_model's verification of the artifact
    against the quantized IR passes."""
    import slimc
    from tests.cnn_models import save_hf_model

    model = save_hf_model("mobilenet_v2", tmp_path / "mobilenet_v2")
    result = slimc.compile_model(model, slimc.CompileOptions(
        pipeline="quantize{weights=int8,activations=int8}", output=tmp_path / "out",
        inputs=["pixel_values=1x3x32x32:float32"], threads=2))
    v = result.manifest["verification"]
    assert v["passed"] and v["relative_l2_vs_ir"] < 1e-4, v
    library = (result.output / result.manifest["library"]).read_bytes()
    fused = set(re.findall(rb"slimc_(?:linear_w8a8|conv_w8a8_depthwise_nhwc)\w*_e[0-9a-f]{10}",
                           library))
    assert any(b"depthwise" in k for k in fused) and any(b"linear" in k for k in fused), fused
