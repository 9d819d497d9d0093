"""int8 weights *and* activations (W8A8): calibration, kernels and artifacts.

The kernels are checked against exact integer arithmetic on shapes that do not fit their
register blocks; the artifacts are real TVM builds verified against the quantized IR by
``compile_model`` (which refuses an artifact that disagrees).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from slimc.backends.tvm import int8_kernels
from slimc.backends.tvm.quantized_ops import OPS
from slimc.passes.quantize.activations import static_int8
from slimc.passes.quantize.quantize import QuantizeOptions, quantize_ir

import slimc
from slimc.capture import capture, load_model
from slimc.loaders.base import parse_overrides
from slimc.passmanager import PassContext, relative_l2
from slimc.plugins import get_registry


def _host_target():
    import tvm
    from tvm.target import codegen

    return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})


def _pack(kind: str, wq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights in the kernel's layout and the activation-offset compensation."""
    n, k = wq.shape
    if kind == "generic":
        t = next(t for t in (16, 8, 4, 2, 1) if n % t == 0)
        return wq.reshape(n // t, t, k).transpose(0, 2, 1).copy(), np.zeros(n, np.int32)
    lanes, g = int8_kernels.lanes(kind), int8_kernels.group(kind)
    packed = wq.reshape(n // lanes, lanes, k // g, g).transpose(0, 2, 1, 3).copy()
    comp = int8_kernels.activation_offset(kind) * wq.astype(np.int32).sum(1)
    return packed, comp.astype(np.int32)


def run_kernel(kind: str, m: int, k: int, n: int, target, seed: int = 0,
               extremes: bool = False, symbolic: bool = False):
    """Build one kernel, run it on random codes; returns (result, exact reference).
    ``extremes``: every code -128 or 127 (the largest products and pair sums); ``symbolic``:
    the dot kernel built for any row count, fed ``m`` rows zero-padded to whole row blocks as
    ``quantized_ops.int8_matmul`` does (the padding rows' output is dropped)."""
    import tvm

    rng = np.random.default_rng(seed)
    low = -128 if extremes else -127
    aq = rng.integers(low, 128, (m, k)).astype(np.int8)
    wq = rng.integers(low, 128, (n, k)).astype(np.int8)
    if extremes:
        aq = np.where(aq < 0, -128, 127).astype(np.int8)
        wq = np.where(wq < 0, -128, 127).astype(np.int8)
    scale = rng.random(n).astype(np.float32) * 1e-3
    bias = rng.standard_normal(n).astype(np.float32)
    exact = (aq.astype(np.int64) @ wq.T.astype(np.int64)) * scale.astype(np.float64) + bias
    a = (aq.astype(np.int16) + int8_kernels.activation_offset(kind)).astype(
        int8_kernels.activation_dtype(kind))
    packed, comp = _pack(kind, wq)
    func = (int8_kernels.generic_kernel(m, k, n, packed.shape[-1]) if kind == "generic"
            else int8_kernels.dot_kernel(kind, None if symbolic else m, k, n))
    lib = tvm.tirx.build(func, target=target)
    dev = tvm.cpu()
    shape = (m, n)
    if symbolic:
        rows = int8_kernels.ROWS
        q = -(-m // rows)
        a = np.concatenate([a, np.zeros((q * rows - m, k), a.dtype)]).reshape(q, rows, k)
        shape = (q, rows, n)
    args = [tvm.runtime.tensor(v, dev) for v in (a, packed, comp, scale, bias)]
    out = tvm.runtime.tensor(np.zeros(shape, np.float32), dev)
    lib(*args, out)
    return out.numpy().reshape(-1, n)[:m], exact


AWKWARD = [(1, 8, 16), (3, 20, 48), (5, 64, 32), (7, 36, 80), (128, 384, 64)]


@pytest.mark.parametrize("m,k,n", AWKWARD)
def test_generic_int8_kernel_is_exact(m, k, n):
    got, exact = run_kernel("generic", m, k, n, _host_target())
    np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("m,k,n", AWKWARD)
def test_vnni_kernel_is_exact(m, k, n):
    target = _host_target()
    if int8_kernels.kernel_kind(target) != "vnni":
        # The kernel cannot execute without the instruction; the kind selection itself is
        # tested without one (test_kernel_kind_follows_the_target_features).
        pytest.skip("this host has no AVX-512 VNNI")
    got, exact = run_kernel("vnni", m, k, n, target)
    np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-5)


#: x86-64-v3 (AVX2, no VNNI): the AVX2 kernel's target, runnable on any AVX2 host.
V3 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}


@pytest.mark.parametrize("m,k,n,extremes", [*((*s, False) for s in AWKWARD),
                                            (4, 4096, 16, True), (9, 4096, 24, True)])
def test_avx2_kernel_is_exact(m, k, n, extremes):
    """``vpmaddwd`` on int16 codes equals the int64 reference, K = 4096 of -128 / 127 included
    (a pair sum of 2 * 128 * 128 = 32768 still fits: the instruction saturates nothing)."""
    import tvm

    from slimc.isa import cpu_flags

    if "avx2" not in (cpu_flags() or set()):
        pytest.skip("this host has no AVX2")
    target = tvm.target.Target(V3)
    assert int8_kernels.kernel_kind(target) == "avx2"
    got, exact = run_kernel("avx2", m, k, n, target, extremes=extremes)
    np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", ["vnni", "avx2"])
def test_symbolic_row_dot_kernels_are_exact(kind):
    """One kernel built for any row count (a dynamic sequence length) equals the int64
    reference at 1, 37 and 128 rows (partial, odd and whole row blocks), extremes included."""
    import tvm

    target = _host_target() if kind == "vnni" else tvm.target.Target(V3)
    if kind == "vnni" and int8_kernels.kernel_kind(target) != "vnni":
        pytest.skip("this host has no AVX-512 VNNI")
    from slimc.isa import cpu_flags

    if kind == "avx2" and "avx2" not in (cpu_flags() or set()):
        pytest.skip("this host has no AVX2")
    for m, k, n, extremes in ((1, 36, 80 if kind == "avx2" else 96, False),
                              (37, 384, 64, False), (128, 20, 32, True)):
        got, exact = run_kernel(kind, m, k + (-k) % 4, n, target, extremes=extremes,
                                symbolic=True)
        np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-5)


def test_kernel_kind_follows_the_target_features():
    import tvm

    def kind(spec):
        return int8_kernels.kernel_kind(tvm.target.Target(spec))

    assert kind({"kind": "llvm", "mcpu": "znver4"}) == "vnni"
    assert kind({"kind": "llvm", "mcpu": "haswell"}) == "avx2"
    assert kind({"kind": "llvm", "mcpu": "znver3"}) == "avx2"
    assert kind({"kind": "llvm", "mcpu": "x86-64-v3"}) == "avx2"
    assert kind({"kind": "llvm", "mcpu": "x86-64-v2"}) == "generic"
    assert kind({"kind": "llvm", "mcpu": "x86-64"}) == "generic"
    assert kind({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                 "mattr": ["+neon", "+dotprod"]}) == "sdot"
    assert kind({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}) \
        == "generic"


def test_smoothing_search_is_never_worse_than_plain_max_scaling():
    torch.manual_seed(0)
    rows = torch.randn(512, 64)
    rows[:, 3] *= 40.0  # one outlier channel, as in real transformer activations
    weight = torch.randn(32, 64)
    best = static_int8(weight, rows.abs().amax(0), rows)
    scale = float(rows.abs().max()) / 127
    codes = torch.clamp(torch.round(rows / scale), -127, 127) * scale
    w = weight.abs().amax(1, keepdim=True) / 127
    plain = codes @ (torch.round(weight / w) * w).t()
    ref = rows @ weight.t()
    plain_err = float((ref - plain).pow(2).mean() / ref.pow(2).mean())
    assert best.error <= plain_err
    assert best.alpha > 0  # the outlier channel makes migration pay
    assert best.error < 0.5 * plain_err


def _ir(model: str):
    return capture(load_model(model, parse_overrides([]), get_registry()))


def test_w8a8_rewrites_linears_and_keeps_embeddings_weight_only(hf_dir):
    from slimc.passes.analysis.layers import op_name
    from slimc.passes.analysis.op_costs import op_flops

    def macs(ir) -> int:
        return sum(op_flops(op_name(n), n)[0] for n in ir.nodes("call_function"))

    ir, inputs = _ir(hf_dir("bert"))
    before, macs_before = ir.run(inputs), macs(ir)
    summary = quantize_ir(ir, PassContext(example_inputs=inputs),
                          QuantizeOptions(weights="int8", activations="int8"))
    assert macs(ir) == macs_before  # the cost model still sees the quantized linears' work
    ops = [n.target for n in ir.nodes("call_function")]
    assert OPS["linear_w8a8"] in ops and OPS["embedding_int8"] in ops
    assert OPS["linear_int8"] not in ops
    w8a8 = [k for k, v in summary["per_layer"].items() if v.get("activations") == "int8"]
    assert {v["format"] for v in summary["per_layer"].values()} == {"int8"}
    assert len(w8a8) == 13 and not any("embeddings" in k for k in w8a8)  # 2 x 6 + pooler
    assert relative_l2(before, ir.run(inputs)) < 0.05


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_w8a8_artifact_matches_the_quantized_ir(hf_dir, tmp_path, arch):
    result = slimc.compile_model(hf_dir(arch), slimc.CompileOptions(
        pipeline="quantize{weights=int8,activations=int8}", output=tmp_path / "out",
        threads=2))
    m = result.manifest
    assert m["verification"]["passed"] and m["verification"]["relative_l2_vs_ir"] < 1e-4
    assert 0 < m["pipeline"][0]["fidelity"]["relative_l2_vs_previous"] < 0.05


def _kernel_names(ir, target) -> set[str]:
    from slimc.backends.tvm.lower import lower_to_relax

    mod = lower_to_relax(ir, get_registry().converters, target)
    return {gv.name_hint for gv, _ in mod.functions_items() if "w8a8" in gv.name_hint}


@pytest.mark.parametrize("target,kernel", [("arm-v8.2", "sdot"), ("arm", "generic")])
def test_w8a8_artifact_runs_on_aarch64(hf_dir, tmp_path, aarch64_emulator, target, kernel):
    """sdot (Armv8.2 dot product) and the plain-NEON fallback, run under qemu-aarch64."""
    from slimc.targets import resolve_target

    ir, inputs = _ir(hf_dir("bert"))
    quantize_ir(ir, PassContext(example_inputs=inputs),
                QuantizeOptions(weights="int8", activations="int8"))
    names = _kernel_names(ir, resolve_target(target).tvm_target())
    assert names and all(f"w8a8_{kernel}" in name for name in names), names
    result = slimc.compile_model(hf_dir("bert"), slimc.CompileOptions(
        pipeline="quantize{weights=int8,activations=int8}", output=tmp_path / target,
        target=target, emulate="require"))
    v = result.manifest["verification"]
    assert v["passed"] and v["ran_on"].startswith("qemu") and v["relative_l2_vs_ir"] < 1e-4


def test_w8a8_from_the_command_line_with_text_calibration(cli, hf_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 40)
    out = tmp_path / "cli"
    result = cli("compile", hf_dir("bert"), "--pipeline",
                 "quantize{weights=int8,activations=int8}", "--calib", str(text), "-o", str(out))
    assert result.code == 0, result.err
    manifest = slimc.load(out).manifest
    per_layer = manifest["pipeline"][0]["summary"]["per_layer"]
    assert manifest["verification"]["passed"]
    assert manifest["verification"]["rounding_noise_floor"] is not None  # measured
    assert sum(v.get("activations") == "int8" for v in per_layer.values()) == 13


def awkward_mlp():
    """Linear layers whose sizes fit no register block: 7 rows, K=36/20, N=20/12."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(36, 20), torch.nn.GELU(), torch.nn.Linear(20, 12))
    return net.eval(), {"input": torch.randn(7, 36)}


@pytest.mark.parametrize("target", ["llvm", "arm-v8.2", "arm"])
def test_w8a8_awkward_shapes_on_every_kernel(target, tmp_path, request):
    if target != "llvm":
        request.getfixturevalue("aarch64_emulator")
    result = slimc.compile_model("tests.test_w8a8:awkward_mlp", slimc.CompileOptions(
        pipeline="quantize{weights=int8,activations=int8}", output=tmp_path / "out",
        target=target, emulate="require" if target != "llvm" else "auto"))
    v = result.manifest["verification"]
    assert v["passed"] and v["relative_l2_vs_ir"] < 1e-5
    assert 0 < result.manifest["pipeline"][0]["fidelity"]["relative_l2_vs_previous"] < 0.05


def odd_k_mlp():
    """5 rows; K = 37 (zero-padded to 40 for the dot kernels), N = 24 and 16 (AVX2 lanes)."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(37, 24), torch.nn.GELU(), torch.nn.Linear(24, 16))
    return net.eval(), {"input": torch.randn(5, 37)}


def test_w8a8_linears_on_the_avx2_kernel(tmp_path):
    """x86-64-v3: both linears on ``vpmaddwd`` (the K = 37 one padded), verified against the
    IR where this CPU runs AVX2 code."""
    from slimc.targets import resolve_target
    from tests.w8a8_reference import runs_here

    ir, inputs = _ir("tests.test_w8a8:odd_k_mlp")
    quantize_ir(ir, PassContext(example_inputs=inputs),
                QuantizeOptions(weights="int8", activations="int8"))
    names = _kernel_names(ir, resolve_target("x86-64-v3").tvm_target())
    assert len(names) == 2 and all("w8a8_avx2_" in n for n in names), names
    assert any("x40x24" in n for n in names), names  # K = 37 padded to 40
    if not runs_here("x86-64-v3"):
        pytest.skip("this CPU cannot run x86-64-v3 code")
    result = slimc.compile_model("tests.test_w8a8:odd_k_mlp", slimc.CompileOptions(
        pipeline="quantize{weights=int8,activations=int8}", output=tmp_path / "out",
        target="x86-64-v3"))
    v = result.manifest["verification"]
    assert v["passed"] and v["relative_l2_vs_ir"] < 1e-5


def test_layers_above_the_error_bound_keep_float_inputs(hf_dir):
    ir, inputs = _ir(hf_dir("bert"))
    everything = quantize_ir(ir, PassContext(example_inputs=inputs),
                             QuantizeOptions(weights="int8", activations="int8"))
    errors = sorted(v["calib_error"] for v in everything["per_layer"].values()
                    if v.get("activations") == "int8")
    bound = errors[len(errors) // 2]
    ir, inputs = _ir(hf_dir("bert"))
    summary = quantize_ir(ir, PassContext(example_inputs=inputs), QuantizeOptions(
        weights="int8", activations="int8", act_max_error=bound))
    kept = [v for v in summary["per_layer"].values() if "w8a8_calib_error" in v]
    assert kept and all(v["w8a8_calib_error"] > bound for v in kept)
    assert len(kept) == sum(e > bound for e in errors)
    ops = [n.target for n in ir.nodes("call_function")]
    assert OPS["linear_int8"] in ops and OPS["linear_w8a8"] in ops


@pytest.mark.parametrize("target,kernel", [("llvm", None), ("x86-64-v3", "avx2"),
                                           ("arm-v8.2", "sdot")])
def test_w8a8_dynamic_sequence_uses_the_dot_kernels(hf_dir, tmp_path, dynamic_default, target,
                                                    kernel, request):
    """With the dynamic default (no ``--input``) the linears still run the dot kernels, built
    for a symbolic row count, and the artifact matches the quantized IR at every checked
    length (1, 37 and the longest; sdot under qemu-aarch64)."""
    from slimc.targets import resolve_target
    from tests.w8a8_reference import runs_here

    kernel = kernel or int8_kernels.kernel_kind(resolve_target(target).tvm_target())
    if kernel == "sdot":
        request.getfixturevalue("aarch64_emulator")
    elif kernel == "generic" or not runs_here(target):
        pytest.skip(f"this CPU runs no dot kernel for {target}")
    result = slimc.compile_model(hf_dir("bert"), slimc.CompileOptions(
        pipeline="quantize{weights=int8,activations=int8}", output=tmp_path / "out",
        target=target, threads=2, cache=False,
        emulate="require" if kernel == "sdot" else "auto"))
    m = result.manifest
    v = m["verification"]
    assert m["model"]["default_sequence"] == "dynamic"
    assert v["passed"] and v["relative_l2_vs_ir"] < 1e-4
    # under the emulator the policy checks the example length (8: whole row blocks) and 1
    assert ({1} if kernel == "sdot" else {1, 37}) <= {s["sizes"]["seq"] for s in v["shapes"]}
    assert all(s["passed"] for s in v["shapes"])
    symbols = (result.output / "model.so").read_bytes()
    assert f"w8a8_{kernel}_dynx".encode() in symbols, "no symbolic-row dot kernel"
    assert b"w8a8_generic" not in symbols
