"""The ``quantize`` pass: formats, rounding methods, the budget solver, and real artifacts.

Every compile here builds a real TVM library, runs it and compares it with the quantized IR
(``compile_model`` refuses to write an artifact that disagrees), so "the artifact computes at
the quantized precision" is checked end to end; the byte tests look at the constants the
library stores after TVM's constant folding.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import transformers as T
from slimc.backends.tvm.quantized_ops import OPS, constant_bytes
from slimc.passes.quantize import mixed
from slimc.passes.quantize.awq import awq_scale
from slimc.passes.quantize.formats import (
    Format,
    dequantize_int4,
    fake_quantize,
    int4_codes,
    int4_params,
    pack_int4,
    unpack_int4,
)
from slimc.passes.quantize.gptq import gptq
from slimc.passes.quantize.layers import find_layers
from slimc.passes.quantize.quantize import QuantizeOptions, quantize_ir

import slimc
from slimc.capture import capture, load_model
from slimc.loaders.base import parse_overrides
from slimc.passmanager import PassContext, relative_l2
from slimc.plugins import get_registry

# -- factories (``tests.test_quantize:medium_llama``) -----------------------------------------


def medium_llama():
    """A Llama (GQA) whose linear and embedding weights dominate its bytes, as in real LMs."""
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                           max_position_embeddings=64)
    model = T.LlamaForCausalLM(config).eval()
    model.config.use_cache = False
    ids = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}


def _ir(model: str):
    return capture(load_model(model, parse_overrides([]), get_registry()))


def _compile(model: str, pipeline: str, tmp_path, **kw):
    return slimc.compile_model(model, slimc.CompileOptions(
        pipeline=pipeline, output=tmp_path / "out", threads=2, **kw))


# -- formats ----------------------------------------------------------------------------------


def test_int4_pack_round_trip_and_two_codes_per_byte():
    codes = torch.randint(0, 16, (5, 37), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 19) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, 37), codes)
    assert torch.equal(packed[:, 0], codes[:, 0] | (codes[:, 1] << 4))


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_rtn_error_is_at_most_half_a_step(symmetric):
    w = torch.randn(8, 256)
    params = int4_params(w, 64, symmetric)
    deq = dequantize_int4(pack_int4(int4_codes(w, params)), params.scale, params.zero, 64, 256)
    step = params.scale.repeat_interleave(64, dim=1)
    assert ((w - deq).abs() <= step / 2 + 1e-6).all()


def test_int4_embedding_whose_width_is_not_a_multiple_of_the_group():
    """SmolLM2's 576-wide table at g128 (4.5 groups): the gather returns 576 columns."""
    w = torch.randn(10, 48)
    params = int4_params(w, 32, False)
    packed = pack_int4(int4_codes(w, params))
    ids = torch.tensor([[3, 7]])
    out = OPS["embedding_int4"](packed, params.scale, params.zero, ids, 32)
    full = dequantize_int4(packed, params.scale, params.zero, 32, 48)
    assert out.shape == (1, 2, 48)
    torch.testing.assert_close(out[0], full[ids[0]])


def test_bits_per_weight_include_scales():
    assert Format("int8").bits_per_weight(512) == pytest.approx(8 + 32 / 512)
    assert Format("int4", 128).bits_per_weight(512) == pytest.approx(4 + 40 / 128)
    assert Format("int4", 128).bits_per_weight(512) / 32 < 1 / 7


# -- rounding methods -------------------------------------------------------------------------


def _correlated_inputs(rows: int, k: int) -> torch.Tensor:
    """Inputs on a few directions plus noise, with some large channels, like LLM activations."""
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(rows, 16, generator=g) @ torch.randn(16, k, generator=g)
    noise = 0.1 * torch.randn(rows, k, generator=g)
    return (low_rank + noise) * torch.logspace(-0.5, 0.5, k)


def test_gptq_beats_rtn_on_the_layer_output():
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), _correlated_inputs(2048, 128)
    fmt = Format("int4", 32)
    codes, params = gptq(w, 2 * x.t() @ x / len(x), fmt)
    q_gptq = dequantize_int4(pack_int4(codes), params.scale, params.zero, 32, 128)
    err_gptq = (x @ (w - q_gptq).t()).pow(2).mean()
    err_rtn = (x @ (w - fake_quantize(w, fmt)).t()).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn


def test_awq_is_never_worse_than_rtn_on_its_samples():
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), _correlated_inputs(512, 128)
    fmt = Format("int4", 32)
    _, err = awq_scale(w, x.abs().mean(0), x, fmt)
    rtn = float((x @ w.t() - x @ fake_quantize(w, fmt).t()).pow(2).mean())
    assert err <= rtn + 1e-9


# -- budget solver ----------------------------------------------------------------------------


def test_knapsack_solver_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        costs = rng.uniform(1, 10, (5, 3))
        damage = rng.uniform(0, 1, (5, 3))
        budget = float(costs.min(1).sum() + rng.uniform(0, 15))
        picks = mixed.solve(costs, damage, budget, resolution=20000)
        assert sum(costs[i, j] for i, j in enumerate(picks)) <= budget + 1e-9
        best = min(sum(damage[i, j] for i, j in enumerate(c))
                   for c in itertools.product(range(3), repeat=5)
                   if sum(costs[i, j] for i, j in enumerate(c)) <= budget)
        assert sum(damage[i, j] for i, j in enumerate(picks)) <= best + 0.02


def test_mixed_beats_uniform_at_the_same_bytes(hf_dir):
    model = hf_dir("llama")
    ir, inputs = _ir(model)
    ctx = PassContext(example_inputs=inputs)
    reference = ir.run(inputs)
    shapes = [tuple(la.matrix(ir).shape) for la in find_layers(ir)]
    budget = mixed.uniform_bits(Format("int4", 16), shapes)

    uniform, _ = _ir(model)
    quantize_ir(uniform, ctx, QuantizeOptions(weights="int4", group_size=16))
    summary = quantize_ir(ir, ctx, QuantizeOptions(
        weights="mixed", budget=budget, candidates="int4-g32,int4-g16,int8,fp32"))
    assert summary["bytes"] <= summary["budget_bytes"] * 1.01
    assert summary["bytes_after"] <= uniform.weight_bytes() + 64
    assert relative_l2(reference, ir.run(inputs)) < relative_l2(reference, uniform.run(inputs))


def test_mixed_reads_int8_damage_from_the_cached_sensitivity_analysis(hf_dir):
    """int8 on linear layers comes from ``sensitivity{criterion=perturbation}`` (same measure
    as the in-pass one), computed once; int4 groups are measured in the pass, memoised."""
    from slimc.passmanager import AnalysisManager, PassManager

    ir, inputs = _ir(hf_dir("llama"))
    ctx = PassContext(example_inputs=inputs)
    ctx.analyses = AnalysisManager(ir, ctx, PassManager(get_registry().passes).lookup)
    layers = find_layers(ir)
    candidates = [Format("int4", 32), Format("int8"), Format("fp32")]
    table = mixed.damage_table(ir, ctx, layers, candidates)
    linear = [i for i, la in enumerate(layers) if not la.is_embedding]
    assert all(table.source[i, 1] == "analysis" for i in linear)
    assert all(table.source[i, 0] == "measured" for i in range(len(layers)))
    assert (table.damage[:, 2] == 0).all() and (table.damage[:, :2] > 0).all()
    # The analysis's q8 is slimc's int8 format under the same measure: the numbers agree.
    i = linear[0]
    measured = mixed.measure_damage(ir, layers[i:i + 1], candidates[1:2], ctx.calibration())
    assert measured[0, 0] == pytest.approx(table.damage[i, 1], rel=1e-6)
    again = mixed.damage_table(ir, ctx, layers, candidates)
    np.testing.assert_allclose(again.damage, table.damage)
    computed = [done for name, done in ctx.analyses.history if name == "sensitivity-perturbation"]
    assert computed[0] and not any(computed[1:])


def test_mixed_with_a_proxy_criterion_takes_every_entry_from_the_analysis(hf_dir):
    from slimc.passmanager import AnalysisManager, PassManager

    ir, inputs = _ir(hf_dir("llama"))
    ctx = PassContext(example_inputs=inputs)
    ctx.analyses = AnalysisManager(ir, ctx, PassManager(get_registry().passes).lookup)
    layers = find_layers(ir)
    candidates = [Format("int4", 64), Format("int4", 16), Format("int8"), Format("fp32")]
    table = mixed.damage_table(ir, ctx, layers, candidates, criterion="taylor")
    assert set(table.source[:, :3].ravel()) == {"analysis"}
    # finer groups and more bits never look worse than coarser ones
    assert (table.damage[:, 0] >= table.damage[:, 1]).all()
    assert (table.damage[:, 1] >= table.damage[:, 2]).all() and (table.damage[:, 3] == 0).all()
    mixed.damage_table(ir, ctx, layers, candidates, criterion="taylor")
    history = ctx.analyses.history
    assert [done for name, done in history if name == "sensitivity"] == [True, False]
    assert [done for name, done in history if name == "sensitivity-taylor"] == [True]


@pytest.mark.parametrize("m,k,n,group", [(1, 256, 64, 64), (3, 96, 24, 32), (2, 80, 16, 32),
                                         (1, 576, 48, 128), (2, 81, 16, 32)])
def test_int4_kernel_matches_the_reference(m, k, n, group):
    """The factored int4 kernel (zero-padded to whole groups when K % group != 0, as the
    converter does) and the per-k fallback (odd K) vs PyTorch."""
    import tvm
    from slimc.backends.tvm import quantized_ops as q

    torch.manual_seed(0)
    w = torch.randn(n, k)
    params = int4_params(w, group, False)
    packed = pack_int4(int4_codes(w, params))
    x = torch.randn(m, k)
    expected = x @ dequantize_int4(packed, params.scale, params.zero, group, k).t()
    t = q.tile_for(n, "int4")

    def tiles(a):
        return a.reshape(n // t, t, -1).permute(0, 2, 1).contiguous().numpy()

    func = q.linear_kernel("int4", m, k, n, group)
    assert ("int4f" in str(func.attrs["global_symbol"])) == (k % 2 == 0)
    if k % 2 == 0 and k % group:
        padded = -(-k // group) * group
        x = torch.nn.functional.pad(x, (0, padded - k))
        packed = torch.nn.functional.pad(packed, (0, (padded - k) // 2))
    lib = tvm.compile(tvm.IRModule({"main": func}), target={"kind": "llvm"})
    args = [tvm.runtime.tensor(a) for a in (x.numpy(), tiles(packed), tiles(params.scale),
                                            tiles(params.zero), np.zeros((m, n), "float32"))]
    lib["main"](*args)
    np.testing.assert_allclose(args[-1].numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)


# -- the pass on real architectures, built and verified by TVM ------------------------------


@pytest.mark.parametrize("arch,pipeline", [
    ("llama", "quantize{weights=int8}"),
    ("gpt2", "quantize{weights=int4,group_size=32}"),
    ("bert", "quantize{weights=int4,group_size=16,symmetric=true,method=gptq}"),
    ("llama", "quantize{weights=int4,group_size=32,method=awq}"),
    ("llama", "quantize{weights=int4,group_size=24}"),  # partial last groups: zero-padded
    ("gpt2", "quantize{weights=fp16}"),
    ("bert", "quantize{weights=bf16}"),
])
def test_quantized_artifact_matches_quantized_ir(hf_dir, tmp_path, arch, pipeline):
    result = _compile(hf_dir(arch), pipeline, tmp_path)
    m = result.manifest
    assert m["verification"]["passed"] and m["verification"]["relative_l2_vs_ir"] < 1e-5
    assert m["weight_bytes_after"] < m["weight_bytes_before"] * (0.6 if "int" in pipeline
                                                                 else 0.8)
    fid = m["pipeline"][0]["fidelity"]["relative_l2_vs_previous"]
    assert 0 < fid < (0.02 if "weights=int8" in pipeline or "16" in pipeline.split("=")[1]
                      else 0.3)


def test_tied_output_head_shares_the_packed_embedding(hf_dir):
    ir, inputs = _ir(hf_dir("gpt2"))
    quantize_ir(ir, PassContext(example_inputs=inputs), QuantizeOptions(weights="int8"))
    ops = {n.target for n in ir.nodes("call_function")}
    assert OPS["embedding_int8"] in ops and OPS["linear_int8"] in ops
    assert not {torch.ops.aten.addmm.default, torch.ops.aten.embedding.default} & ops
    shared = [n for n in ir.nodes("placeholder")
              if {u.target for u in n.users} == {OPS["linear_int8"], OPS["embedding_int8"]}]
    assert [n.meta["val"].dtype for n in shared] == [torch.int8, torch.float32]  # codes, scale


def test_quantized_ir_survives_save_and_load(hf_dir, tmp_path):
    from slimc.ir import IR

    ir, inputs = _ir(hf_dir("llama"))
    quantize_ir(ir, PassContext(example_inputs=inputs), QuantizeOptions(weights="int4",
                                                                       group_size=32))
    expected = ir.run(inputs)
    again = IR.load(ir.save(tmp_path / "q.pt2"))
    assert relative_l2(expected, again.run(inputs)) == 0.0


@pytest.mark.parametrize("options,limit", [
    ({"weights": "int8"}, 0.26),
    ({"weights": "int4", "group_size": 128}, 1 / 7),
])
def test_artifact_stores_packed_weights(options, limit, medium_llama_fp32):
    """The constants TVM keeps after constant folding are the packed ones, not fp32."""
    from slimc.backends.tvm.lower import lower_to_relax

    reg = get_registry()
    original, inputs, fp32 = medium_llama_fp32
    ir = original.clone()
    quantize_ir(ir, PassContext(example_inputs=inputs), QuantizeOptions(**options))
    sizes = constant_bytes(lower_to_relax(ir, reg.converters))
    assert sum(sizes.values()) <= limit * fp32
    assert sizes.get("float32", 0) < 0.05 * fp32  # no dequantized weight was folded back


def test_quantized_library_is_smaller(tmp_path):
    fp32 = _compile("tests.test_quantize:medium_llama", "eliminate-dead-code", tmp_path / "a")
    int4 = _compile("tests.test_quantize:medium_llama", "quantize{weights=int4}", tmp_path / "b")
    assert int4.manifest["verification"]["passed"]
    assert int4.manifest["library_bytes"] < 0.25 * fp32.manifest["library_bytes"]


def test_int4_artifact_runs_on_aarch64(hf_dir, tmp_path, aarch64_emulator):
    result = _compile(hf_dir("llama"), "quantize{weights=int4,group_size=32}", tmp_path,
                      target="arm", emulate="require")
    assert result.manifest["verification"]["passed"]
    assert result.manifest["verification"]["ran_on"].startswith("qemu")


@pytest.mark.parametrize("option", ["weights=int5", "group_size=7", "group_size=4",
                                    "method=smoothquant", "activations=int4", "budget=3",
                                    "activations=int8,weights=int4",
                                    "activations=int8,method=gptq"])
def test_bad_options_exit_2(cli, hf_dir, option):
    result = cli("compile", hf_dir("llama"), "--pipeline", f"quantize{{{option}}}")
    assert result.code == 2
    assert option.split("=")[0] in result.err
