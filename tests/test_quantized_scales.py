"""Quantized group scales (``-qs`` formats, issue 17): each group's step and minimum are 8-bit
codes against fp16 row units. Spelling and exact bits, the round trip of Q4_1-grid weights,
GPTQ on the fixed grid, ``distill{scales=true}`` leaving the grids alone, the artifact's
stored bytes (codes, not fp16 grids: nothing folds the rebuild back), real artifacts on the
host and under qemu-aarch64, and a bad spelling's exit 2. Real tiny HF Llama, no mocks."""

from __future__ import annotations

import pytest
import torch
from slimc.passes.quantize.formats import (
    Format,
    coded_codes,
    coded_grid,
    coded_values,
    fake_quantize,
    parse_format,
)
from slimc.passes.quantize.gptq import gptq
from slimc.passes.quantize.rtn import pack

import slimc
from slimc.coded_scales import MIN_LEVELS, STEP_LEVELS, CodedGrid, decode


def _compile(model: str, pipeline: str, out, **kw):
    return slimc.compile_model(model, slimc.CompileOptions(
        pipeline=pipeline, output=out, threads=2, **kw))


def _q4_1(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A weight exactly on an int4-g32 Q4_1 grid (fp16 step and minimum per group of 32)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
    codes[..., 0], codes[..., 1] = 0, 15  # every group spans its grid, as Q4_1's do
    step = (torch.rand(n, k // 32, 1, generator=g) * 0.02 + 0.002).half().float()
    low = (-(torch.rand(n, k // 32, 1, generator=g) * 0.2 + 0.02)).half().float()
    return (codes * step + low).reshape(n, k)


def test_spelling_and_exact_bits():
    fmt = parse_format("int4-g32-qs")
    assert fmt == Format("int4", 32, float_zero=True, coded_scales=True)
    assert str(fmt) == "int4-g32-qs" and parse_format(str(fmt)) == fmt
    # 4-bit codes + 2 x 8 bits per group + 2 x fp16 per row
    assert fmt.bits_per_weight(576) == pytest.approx(4 + 16 / 32 + 32 / 576)
    assert parse_format("int4-g32-fz-qs") == fmt  # -fz is implied
    assert parse_format("int4-g64-qs").bits_per_weight(1536) == pytest.approx(
        4 + 16 / 64 + 32 / 1536)
    int3 = parse_format("int3-g32-qs")
    assert int3 == Format("int3", 32, coded_scales=True) and str(int3) == "int3-g32-qs"
    # a partial last group is padded to whole groups of codes, like int3-g32
    assert int3.bits_per_weight(40) == pytest.approx((3 * 64 + 2 * 16 + 32) / 40)
    assert parse_format("int2-g64-qs").bits_per_weight(128) == pytest.approx(2 + 16 / 64 + 0.25)
    for bad in ("int4-g32-q8", "int4-sym-qs", "int3-g32-fz", "int4-g33-qs", "int2-g12-qs",
                "int8-qs"):
        with pytest.raises(ValueError, match="unknown weight format"):
            parse_format(bad)


def test_coded_grid_stores_codes_and_rebuilds_an_exact_grid():
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(0))
    fmt = parse_format("int4-g32-qs")
    tensors = pack(w, fmt)
    assert {k: v.dtype for k, v in tensors.items()} == {
        "weight": torch.uint8, "scale_code": torch.uint8, "min_code": torch.int8,
        "scale_unit": torch.float16, "min_unit": torch.float16}
    assert tensors["scale_code"].shape == (16, 3) and tensors["scale_unit"].shape == (16,)
    bits = 8 * sum(t.numel() * t.element_size() for t in tensors.values())
    assert bits == pytest.approx(fmt.bits_per_weight(96) * w.numel())
    codes = tensors["scale_code"].int()
    assert codes.min() >= 1 and codes.max() == STEP_LEVELS  # the row's largest step is 255
    assert tensors["min_code"].int().abs().max() <= MIN_LEVELS
    coded = CodedGrid(tensors["scale_code"], tensors["min_code"], tensors["scale_unit"],
                      tensors["min_unit"])
    step = decode(coded.scale_code, coded.scale_unit)
    assert step.dtype == torch.float16
    assert torch.equal(step, (codes.float() * coded.scale_unit.float()[:, None]).half())
    # every weight of the result is a code on the decoded grid, and rounding it again is a no-op
    rebuilt = fake_quantize(w, fmt)
    assert torch.equal(fake_quantize(rebuilt, fmt), rebuilt)


@pytest.mark.parametrize("shape", [(24, 576), (7, 1536)])
def test_q4_1_weights_round_trip_within_two_percent(shape):
    w = _q4_1(*shape)
    assert torch.equal(fake_quantize(w, parse_format("int4-g32-fz")), w)  # on the Q4_1 grid
    rebuilt = fake_quantize(w, parse_format("int4-g32-qs"))
    error = float((rebuilt - w).norm() / w.norm())
    assert 0 < error < 0.02
    # the coarser -qs group costs more: still an int4 grid, just not the Q4_1 one
    assert float((fake_quantize(w, parse_format("int4-g64-qs")) - w).norm() / w.norm()) > error


@pytest.mark.parametrize("name", ["int4-g32-qs", "int3-g32-qs"])
def test_gptq_on_the_fixed_coded_grid_beats_round_to_nearest(name):
    gen = torch.Generator().manual_seed(0)
    fmt = parse_format(name)
    w = torch.randn(16, 128, generator=gen)
    x = torch.randn(512, 128, generator=gen) @ torch.randn(128, 128, generator=gen) * 0.3
    codes, coded = gptq(w, 2 * x.T @ x, fmt)
    assert isinstance(coded, CodedGrid)
    rtn = coded_grid(w, fmt)  # GPTQ keeps the round-to-nearest grid: only the codes differ
    assert all(torch.equal(a, b) for a, b in zip(coded.tensors().values(),
                                                 rtn.tensors().values(), strict=True))
    q_gptq = coded_values(codes, fmt, coded, 128)
    q_rtn = coded_values(coded_codes(w, fmt, rtn), fmt, rtn, 128)
    assert float((x @ (q_gptq - w).T).norm()) < 0.9 * float((x @ (q_rtn - w).T).norm())
    packed = pack(w, fmt, params=coded, codes=codes)
    assert packed["scale_code"].dtype == torch.uint8 and "scale" not in packed


def test_artifact_constants_are_the_codes_not_fp16_grids(medium_llama_fp32):
    """What TVM keeps after constant folding: the codes, int8 minimum codes and fp16 row
    units, byte for byte what ``bits_per_weight`` counts; the rebuilt fp16 grids are not
    folded into constants."""
    from slimc.backends.tvm.lower import lower_to_relax
    from slimc.backends.tvm.quantized_ops import constant_bytes
    from slimc.passes.quantize.quantize import QuantizeOptions, quantize_ir

    from slimc.passmanager import PassContext
    from slimc.plugins import get_registry

    reg = get_registry()
    original, inputs, fp32 = medium_llama_fp32
    ir = original.clone()
    summary = quantize_ir(ir, PassContext(example_inputs=inputs),
                          QuantizeOptions(weights="int4-g32-qs", embeddings=False))
    layers = summary["per_layer"].values()
    assert layers and all(e["format"] == "int4-g32-qs" for e in layers)
    sizes = constant_bytes(lower_to_relax(ir, reg.converters))
    fmt = parse_format("int4-g32-qs")
    expected = sum(fmt.nbytes(*e["shape"]) for e in layers)
    rows = sum(e["shape"][0] for e in layers)
    groups = sum(e["shape"][0] * -(-e["shape"][1] // 32) for e in layers)
    assert sizes["int8"] == groups  # the minimum codes
    assert sizes["float16"] == 4 * rows  # two fp16 units per row, no fp16 grid
    assert sizes["uint8"] + sizes["int8"] + sizes["float16"] == pytest.approx(expected)
    # the same layers at -fz store 0.5 bit per weight more
    fz = original.clone()
    quantize_ir(fz, PassContext(example_inputs=inputs),
                QuantizeOptions(weights="int4-g32-fz", embeddings=False))
    fz_sizes = constant_bytes(lower_to_relax(fz, reg.converters))
    weights = sum(e["shape"][0] * e["shape"][1] for e in layers)
    saved = sum(fz_sizes.values()) - sum(sizes.values())
    assert saved == pytest.approx(weights * 0.5 / 8 - 4 * rows)


def test_host_artifact_matches_the_torch_reference(hf_dir, tmp_path):
    """int4-g32-qs linears, int3-g32-qs MLP and an int4-g32-qs table: built, run, and equal
    to the IR (whose quantized weights are the torch round trip of the format)."""
    result = _compile(hf_dir("llama"),
                      "quantize{weights=int4-g32-qs,layers=[*mlp*=int3-g32-qs]}", tmp_path / "o")
    m = result.manifest
    assert m["verification"]["passed"] and m["verification"]["relative_l2_vs_ir"] < 1e-5
    formats = {e["format"] for e in m["pipeline"][0]["summary"]["per_layer"].values()}
    assert formats == {"int4-g32-qs", "int3-g32-qs"}
    assert m["weight_bytes_after"] < 0.17 * m["weight_bytes_before"]


def test_quantized_ir_is_the_format_round_trip():
    """The IR's int3-g32-qs linears compute with exactly ``fake_quantize``'s weights."""
    from slimc.lowbit import dequantize_lowbit
    from tests.test_distill import _captured, _run, tiny_llama

    ir, inputs = _captured(tiny_llama)
    originals = [v.clone() for v in ir.weights().values() if v.dim() == 2]
    _run(ir, inputs, "quantize{weights=int3-g32-qs,embeddings=false}")
    fmt = parse_format("int3-g32-qs")

    def value(node):
        if node.op == "placeholder":
            return ir.get_weight(node)
        code, unit = (ir.get_weight(a) for a in node.args[:2])
        return node.target(code, unit, torch.zeros(1))

    nodes = [n for n in ir.nodes("call_function") if "linear_lowbit" in str(n.target)]
    assert nodes and all("coded_scale" in str(n.args[2].target) for n in nodes)
    for node in nodes:
        k = int(node.args[0].meta["val"].shape[-1])
        deq = dequantize_lowbit(value(node.args[1]), value(node.args[2]), value(node.args[3]),
                                3, 32, k)
        assert any(v.shape == deq.shape and torch.equal(fake_quantize(v, fmt), deq)
                   for v in originals)


def test_distill_scales_leaves_coded_grids_fixed():
    from tests.test_distill import _captured, _run, tiny_llama

    ir, inputs = _captured(tiny_llama)
    quantized = ir.clone()
    _run(quantized, inputs, "quantize{weights=int4-g32-qs}")
    before = quantized.weights()
    _run(ir, inputs, "quantize{weights=int4-g32-qs},"
         "distill{steps=6,lr=1e-2,scales=true,trainable=norms}")
    summary, after = ir.annotations["distill"], ir.weights()
    assert after.keys() == before.keys()
    fixed = [k for k, v in before.items() if v.dtype in (torch.uint8, torch.int8, torch.float16)]
    assert any(before[k].dtype == torch.float16 for k in fixed)  # the row units
    assert all(torch.equal(before[k], after[k]) for k in fixed)  # codes and units stay
    assert summary["trained_params"] > 0  # the norms train through the -qs layers
    assert ir.weight_bytes() == quantized.weight_bytes()


def test_aarch64_artifact_runs_under_qemu(hf_dir, tmp_path, aarch64_emulator):
    result = _compile(hf_dir("llama"), "quantize{weights=int4-g64-qs}", tmp_path / "o",
                      target="arm", emulate="require")
    assert result.manifest["verification"]["passed"]
    assert result.manifest["verification"]["ran_on"].startswith("qemu")


@pytest.mark.parametrize("pipeline", ["quantize{weights=int4-g32-q8}",
                                      "quantize{layers=[*=int3-g32-fz]}"])
def test_bad_spelling_exits_2_with_one_paragraph(cli, hf_dir, pipeline):
    result = cli("compile", hf_dir("llama"), "--pipeline", pipeline)
    assert result.code == 2
    assert "unknown weight format" in result.err and "-qs" in result.err
    assert "Traceback" not in result.err


# ---- narrower codes: -qs5 / -qs6 (bit-packed step and minimum codes) ----


def test_narrow_code_spelling_bits_and_strict_parser():
    fmt = parse_format("int3-g32-qs5")
    assert fmt == Format("int3", 32, coded_scales=True, scale_bits=5)
    assert str(fmt) == "int3-g32-qs5" and parse_format(str(fmt)) == fmt
    # 3-bit codes + 2 x 5 bits per group + 2 x fp16 per row (SmolLM2's gate/up: K = 576)
    assert fmt.bits_per_weight(576) == pytest.approx(3 + 10 / 32 + 32 / 576)
    int4 = parse_format("int4-g32-qs6")
    assert int4 == Format("int4", 32, float_zero=True, coded_scales=True, scale_bits=6)
    assert str(int4) == "int4-g32-qs6"
    assert int4.bits_per_weight(1536) == pytest.approx(4 + 12 / 32 + 32 / 1536)
    for bad, why in (("int3-g32-qs8", "spelled -qs"), ("int3-g32-qs3", "not a code width"),
                     ("int4-g32-qs5-qs", "given twice"), ("int3-g32-qsx", "not a code width"),
                     ("int4-g32-sym-qs5", "-sym together")):
        with pytest.raises(ValueError, match="unknown weight format") as err:
            parse_format(bad)
        assert why in str(err.value)


@pytest.mark.parametrize("name", ["int3-g32-qs5", "int4-g32-qs6", "int2-g64-qs4"])
def test_narrow_codes_are_packed_exactly_and_rebuild_the_grid(name):
    from slimc.coded_scales import coded_scale, levels, unpack_codes

    fmt = parse_format(name)
    w = torch.randn(17, 200, generator=torch.Generator().manual_seed(1))
    tensors = pack(w, fmt)
    groups = -(-200 // fmt.group_size)
    stream = -(-17 * groups * fmt.scale_bits // 8)  # bytes of one packed code stream
    assert tensors["scale_code"].shape == (stream,) == tensors["min_code"].shape
    assert tensors["scale_code"].dtype == tensors["min_code"].dtype == torch.uint8
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert 0 <= stored - fmt.nbytes(17, 200) < 2  # exact up to each stream's last byte
    grid = coded_grid(w, fmt)
    top_step, top_min = levels(fmt.scale_bits)
    assert int(grid.scale_code.max()) == top_step and int(grid.min_code.abs().max()) <= top_min
    assert torch.equal(unpack_codes(tensors["scale_code"], fmt.scale_bits, 17, groups),
                       grid.scale_code)
    assert torch.equal(unpack_codes(tensors["min_code"], fmt.scale_bits, 17, groups, True),
                       grid.min_code)
    like = torch.zeros(1)
    step = coded_scale(tensors["scale_code"], tensors["scale_unit"], like, fmt.scale_bits,
                       groups, False)
    minimum = coded_scale(tensors["min_code"], tensors["min_unit"], like, fmt.scale_bits,
                          groups, True)
    assert torch.equal(step, grid.decoded()[0]) and torch.equal(minimum, grid.decoded()[1])
    rebuilt = fake_quantize(w, fmt)  # the weights on the decoded grid
    assert torch.equal(rebuilt, coded_values(coded_codes(w, fmt, grid), fmt, grid, 200))
    # fewer code bits, a coarser grid: more error than 8-bit codes, less than twice as much
    eight = parse_format(name.rsplit("-qs", 1)[0] + "-qs")
    e8 = float((fake_quantize(w, eight) - w).norm() / w.norm())
    assert e8 <= float((rebuilt - w).norm() / w.norm()) < 2 * e8


def test_narrow_codes_gptq_keeps_the_coded_grid():
    gen = torch.Generator().manual_seed(0)
    fmt = parse_format("int3-g32-qs5")
    w = torch.randn(16, 128, generator=gen)
    x = torch.randn(512, 128, generator=gen) @ torch.randn(128, 128, generator=gen) * 0.3
    codes, coded = gptq(w, 2 * x.T @ x, fmt)
    assert coded.bits == 5
    rtn = coded_grid(w, fmt)
    assert all(torch.equal(a, b) for a, b in zip(coded.tensors().values(),
                                                 rtn.tensors().values(), strict=True))
    q_gptq = coded_values(codes, fmt, coded, 128)
    q_rtn = coded_values(coded_codes(w, fmt, rtn), fmt, rtn, 128)
    assert float((x @ (q_gptq - w).T).norm()) < 0.9 * float((x @ (q_rtn - w).T).norm())


def test_narrow_code_artifact_stores_packed_codes(medium_llama_fp32):
    """The artifact's constants: weight codes, the two packed code streams per layer and the
    fp16 row units, what ``bits_per_weight`` counts (up to each stream's last byte)."""
    from slimc.backends.tvm.lower import lower_to_relax
    from slimc.backends.tvm.quantized_ops import constant_bytes
    from slimc.passes.quantize.quantize import QuantizeOptions, quantize_ir

    from slimc.passmanager import PassContext
    from slimc.plugins import get_registry

    original, inputs, _ = medium_llama_fp32
    ir = original.clone()
    summary = quantize_ir(ir, PassContext(example_inputs=inputs),
                          QuantizeOptions(weights="int4-g32-qs5", embeddings=False))
    layers = summary["per_layer"].values()
    assert layers and all(e["format"] == "int4-g32-qs5" for e in layers)
    sizes = constant_bytes(lower_to_relax(ir, get_registry().converters))
    fmt = parse_format("int4-g32-qs5")
    expected = sum(fmt.nbytes(*e["shape"]) for e in layers)
    rows = sum(e["shape"][0] for e in layers)
    assert "int8" not in sizes and sizes["float16"] == 4 * rows  # no fp16 grid folded in
    assert 0 <= sizes["uint8"] + sizes["float16"] - expected < 2 * len(layers)


def test_narrow_code_host_artifact_matches_the_torch_reference(hf_dir, tmp_path):
    """int4-g32-qs6 attention, int3-g32-qs5 MLP and an int4-g32-qs5 table (the packed rebuild
    kernel feeding the int4, int3 and gather kernels): built, run, equal to the IR."""
    result = _compile(hf_dir("llama"), "quantize{weights=int4-g32-qs6,layers=[*mlp*="
                      "int3-g32-qs5,*embed*=int4-g32-qs5]}", tmp_path / "o")
    m = result.manifest
    assert m["verification"]["passed"] and m["verification"]["relative_l2_vs_ir"] < 1e-5
    formats = {e["format"] for e in m["pipeline"][0]["summary"]["per_layer"].values()}
    assert formats == {"int4-g32-qs6", "int3-g32-qs5", "int4-g32-qs5"}


def test_narrow_code_aarch64_artifact_runs_under_qemu(hf_dir, tmp_path, aarch64_emulator):
    result = _compile(hf_dir("llama"), "quantize{weights=int3-g32-qs5}", tmp_path / "o",
                      target="arm", emulate="require")
    assert result.manifest["verification"]["passed"]
    assert result.manifest["verification"]["relative_l2_vs_ir"] < 1e-5


def test_bad_code_width_exits_2_with_one_paragraph(cli, hf_dir):
    result = cli("compile", hf_dir("llama"), "--pipeline", "quantize{weights=int3-g32-qs9}")
    assert result.code == 2
    assert "not a code width" in result.err and "-qs5" in result.err
    assert "Traceback" not in result.err and result.err.strip().count("\n") <= 1


# ---- -qs formats as budget-search candidates ----


def _wider_llama(path) -> str:
    """A random-weight HF Llama with 128-wide rows (the test models' 32 make a row's two fp16
    units cost a whole bit per weight, so no ``-qs`` grid would ever be smaller)."""
    import transformers as T

    config = T.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                           max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    T.LlamaForCausalLM(config).eval().save_pretrained(path)
    return str(path)


def test_size_budgets_below_int4_fz_add_coded_formats_on_cpus_only():
    from slimc.passmanager import PassContext
    from slimc.search.space import CODED_BELOW, CODED_FORMATS, Techniques
    from slimc.targets import resolve_target

    base = Techniques.named("all")
    assert not any("-qs" in f for f in base.formats + Techniques.named("precision").formats)
    host = PassContext(target=resolve_target("llvm"))
    assert base.for_size(0.13, host).formats == base.formats + CODED_FORMATS
    assert base.for_size(CODED_BELOW, host) == base and base.for_size(None, host) == base
    cuda = PassContext(target=resolve_target("cuda"))  # no -qs lowering on GPUs
    assert base.for_size(0.13, cuda) == base
    arm = PassContext(target=resolve_target("arm"))
    assert base.for_size(0.13, arm).formats[-2:] == CODED_FORMATS


def test_budget_search_chooses_a_coded_format_and_builds_it(tmp_path):
    """Below int4-g32-fz's bytes the search is offered the -qs formats, picks one where it
    is the only grid that fits, and the recipe it writes builds and verifies."""
    from slimc.capture import capture, load_model
    from slimc.passmanager import AnalysisManager, PassContext, PassManager
    from slimc.plugins import get_registry
    from slimc.search.budget import parse_budget
    from slimc.search.search import Search, pipeline_text, proxy_scorer
    from slimc.search.space import CODED_FORMATS, Techniques

    model = _wider_llama(tmp_path / "llama")
    registry = get_registry()
    ir, example = capture(load_model(model))
    ctx = PassContext(example_inputs=example)
    ctx.analyses = AnalysisManager(ir, ctx, PassManager(registry.passes).lookup)
    techniques = Techniques(formats=("int4-g32-fz",)).for_size(0.15, ctx)
    assert techniques.formats == ("int4-g32-fz", *CODED_FORMATS)
    search = Search(ir, ctx, registry, techniques, proxy_scorer(ir, ctx), None)
    cand, failures = search.fit(parse_budget("size=0.15"), None)  # int4-g32-fz: 0.156
    assert cand is not None, failures
    assert cand.relative["size"] <= 0.15
    coded = {f: n for f, n in cand.choices.items() if "-qs" in f}
    assert coded, cand.choices
    assert "-qs" in pipeline_text(cand.items)
    pipeline = ",".join(name + "{" + ",".join(
        f"{k}=[{v}]" if k == "layers" else f"{k}={str(v).lower()}" for k, v in opts.items())
        + "}" for name, opts in cand.items)
    result = _compile(model, pipeline, tmp_path / "o")
    m = result.manifest
    assert m["verification"]["passed"] and m["verification"]["relative_l2_vs_ir"] < 1e-5
    built = {e["format"] for e in m["pipeline"][0]["summary"]["per_layer"].values()}
    assert set(coded) <= built
