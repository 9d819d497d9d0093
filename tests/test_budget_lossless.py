"""Weights that already lie on a format's grid (a model dequantized from a quantized file, as
SmolLM2-135M's GGUF Q4_1 is) are stored in that format losslessly: the budget search ends
with that candidate when it fits, without its damage table, and prices it at zero when not."""

from __future__ import annotations

import json

import pytest
import torch
from slimc.passes.quantize.formats import fake_quantize_rows, parse_format

from slimc.capture import capture, load_model
from slimc.passmanager import AnalysisManager, PassContext, PassManager
from slimc.plugins import get_registry
from slimc.search.budget import parse_budget
from tests.models import build_hf


def _dequantized_llama(path) -> str:
    """A tiny random Llama whose linears (not its embedding table) were rounded to int4-g32
    grids with fp16 scale and minimum, GGUF Q4_1's layout, and saved back in fp32."""
    model = build_hf("llama", seed=3)
    fmt = parse_format("int4-g32-fz")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(fake_quantize_rows(module.weight.detach().clone(), fmt))
    model.save_pretrained(path)
    return str(path)


def _search(model_dir: str):
    from slimc.search.search import Search, proxy_scorer
    from slimc.search.space import Techniques

    registry = get_registry()
    ir, example = capture(load_model(model_dir))
    ctx = PassContext(example_inputs=example)
    ctx.analyses = AnalysisManager(ir, ctx, PassManager(registry.passes).lookup)
    return Search(ir, ctx, registry, Techniques.named("precision"), proxy_scorer(ir, ctx),
                  None)


def test_a_dequantized_model_is_stored_on_its_own_grids_without_a_damage_table(
        cli, tmp_path):
    model = _dequantized_llama(tmp_path / "llama")
    out = tmp_path / "out"
    result = cli("--verbose", "compile", model, "-O2", "--budget", "size=0.5", "-o", out,
                 "--json", "--no-cache")
    assert result.code == 0, result.err
    logs = result.out + result.err
    assert "no damage table needed" in logs and "choices measured" not in logs
    search = json.loads((out / "manifest.json").read_text())["search"]
    linears = 2 * 7 + 1  # q, k, v, o, gate, up, down per block, and the lm_head
    assert search["lossless"]["used"] is True
    assert search["lossless"]["exact"] == {"int4-g32-fz": linears}, search["lossless"]
    chosen = search["chosen"]
    assert chosen["choices"] == {"int4-g32-fz": linears, "fp32": 1}, chosen
    assert abs(chosen["drop"]) < 1e-6 and len(search["candidates"]) == 1
    assert chosen["relative"]["size"] < 0.5
    assert "already lie on a format's grid" in (out / "report.md").read_text()
    # the recipe stores exactly those formats: its bytes are the candidate's
    summary = json.loads(result.out)
    assert summary["weight_bytes_after"] / summary["weight_bytes_before"] \
        == pytest.approx(chosen["relative"]["size"], rel=1e-3)


def test_exact_choices_over_the_budget_are_priced_at_zero_and_random_weights_have_none(
        tmp_path):
    from slimc.search.exact import exact_picks

    search = _search(_dequantized_llama(tmp_path / "llama"))
    cand, failures = search.fit(parse_budget("size=0.2"), None)
    assert cand is not None, failures
    assert search.exact["used"] is False and "over the budget in size" in \
        search.exact["why_not"], search.exact
    assert search.exact["relative"]["size"] > 0.2
    space = search.base(0.0).space
    exact = exact_picks(search.ir, space)
    for i, j in enumerate(exact.picks):
        if j:  # an exact choice: zero damage in the measured table
            assert space.damage[i, j] == 0.0, space.layers[i].layer.name
    assert exact.exact_layers == 15

    plain = tmp_path / "plain"
    build_hf("llama", seed=3).save_pretrained(plain)
    random = _search(str(plain))
    assert exact_picks(random.ir, random.cost_base().space).exact_layers == 0


def test_o1_stores_weights_on_their_own_grids_and_half_precision_checkpoints_in_bf16(
        cli, tmp_path):
    """-O1 is lossless and now also stores weights where they already lie exactly: a
    dequantized Q4_1-style model's linears as int4-g32-fz, a bf16 checkpoint's linears as
    bf16 (no gather op for bf16: the tables stay fp32), a float-trained model unchanged."""
    bf16 = tmp_path / "bf16"
    model = build_hf("bert", seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(bf16)
    plain = tmp_path / "plain"
    build_hf("bert", seed=1).save_pretrained(plain)
    # (a row of 32 inputs is one group at g32, g64 or g128 alike: the same bytes)
    fz = {"int4-g32-fz", "int4-g64-fz", "int4-g128-fz"}
    for name, path in (("q4", _dequantized_llama(tmp_path / "llama")), ("bf16", bf16),
                       ("plain", plain)):
        out = tmp_path / f"o1-{name}"
        result = cli("compile", path, "-O1", "-o", out, "--json", "--no-cache")
        assert result.code == 0, result.err
        summary = json.loads(result.out)
        assert summary["fidelity"]["relative_l2"] < 1e-5, (name, summary["fidelity"])
        manifest = json.loads((out / "manifest.json").read_text())
        quantize = next(p for p in manifest["pipeline"] if p["pass"] == "quantize")
        formats = {}
        for layer in quantize["summary"]["per_layer"].values():
            formats[layer["format"]] = formats.get(layer["format"], 0) + 1
        ratio = summary["weight_bytes_after"] / summary["weight_bytes_before"]
        if name == "bf16":
            assert set(formats) == {"bf16"} and formats["bf16"] >= 12, formats
            assert ratio < 0.75, ratio
        elif name == "q4":
            assert set(formats) <= fz and sum(formats.values()) == 15, formats
            assert ratio < 0.5, ratio
        else:
            assert formats == {} and quantize["summary"]["layers"] == 0, formats


def _on_grid(rows: int, cols: int, group: int, bits: int, seed: int = 0) -> torch.Tensor:
    """Weights on per-group [min, max] grids of 2^bits levels with fp16 step and minimum (how
    GGUF's Q4_1 stores them), as a checkpoint dequantized from such a file holds them."""
    g = torch.Generator().manual_seed(seed)
    step = (torch.rand(rows, cols // group, 1, generator=g) * 0.02 + 1e-3).half().float()
    low = (-torch.rand(rows, cols // group, 1, generator=g) * 0.1).half().float()
    codes = torch.randint(0, 2 ** bits, (rows, cols // group, group), generator=g).float()
    codes[..., 0], codes[..., 1] = 0, 2 ** bits - 1  # both ends used, as Q4_1's are
    return (codes * step + low).reshape(rows, cols)


def test_exact_check_finds_each_grid_and_rejects_float_weights_before_a_round_trip():
    from slimc.passes.quantize.exact import ExactCheck, levels, most_distinct

    fmt = {name: parse_format(name) for name in
           ("int3-g64", "int4-g32-fz", "int4-g64-fz", "int8", "bf16", "fp16")}
    int3 = ExactCheck(_on_grid(96, 256, 64, 3))
    assert int3(fmt["int3-g64"]) and int3(fmt["int8"]) is False
    q4 = ExactCheck(_on_grid(96, 256, 32, 4))
    assert q4(fmt["int4-g32-fz"]) and not q4(fmt["int4-g64-fz"]) and not q4(fmt["int3-g64"])
    half = ExactCheck(torch.randn(96, 256).to(torch.bfloat16).float())
    assert half(fmt["bf16"]) and not half(fmt["int4-g32-fz"])
    trained = torch.randn(96, 256)
    check = ExactCheck(trained)
    assert not any(check(f) for f in fmt.values())
    # a weight with a NaN or an inf is exact in nothing (every comparison with NaN is false)
    broken = _on_grid(96, 256, 32, 4)
    broken[3, 7] = float("nan")
    assert not any(ExactCheck(broken)(f) for f in fmt.values())
    broken[3, 7] = float("inf")
    assert not any(ExactCheck(broken)(f) for f in fmt.values())
    # the count alone rules the int grids out: a trained group has as many values as inputs
    assert most_distinct(trained[:64], 32) == 32 > levels(fmt["int4-g32-fz"])


def test_explore_puts_the_lossless_point_on_the_front(cli, tmp_path):
    out = tmp_path / "ex"
    result = cli("explore", _dequantized_llama(tmp_path / "llama"), "-o", out, "--sizes",
                 "0.5", "--latencies", "0.99", "--precision-only", "--json")
    assert result.code == 0, result.err
    data = json.loads((out / "explore.json").read_text())
    lossless = [i for i, p in enumerate(data["points"])
                if p["relative"]["size"] < 0.5 and abs(p["drop"]) < 1e-6]
    assert lossless and lossless[0] in data["pareto"]["size"], data["points"]
