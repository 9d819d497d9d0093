"""Text models default to a dynamic sequence length (issue 11): compiled with no ``--input``,
a BERT artifact takes any length up to its position table, and is verified at the lengths the
policy of :mod:`slimc.verify_sizes` picks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

import slimc
from slimc.errors import UsageError
from slimc.loaders.huggingface import MAX_DEFAULT_SEQUENCE
from slimc.verify_sizes import COST_RATIO, ODD_LENGTH, fit_cost, longest_within, plan_lengths
from tests.models import TEXT

MAX_LEN = 256  # conftest's bert256 position table




def test_text_model_compiles_with_a_dynamic_sequence_by_default(bert256, dynamic_default,
                                                                tmp_path):
    path, model = bert256
    result = slimc.compile_model(path, slimc.CompileOptions(output=tmp_path / "out",
                                                            threads=1, cache=False))
    manifest = result.manifest
    seq = {"name": "seq", "min": 1, "max": MAX_LEN}
    assert {i["name"]: i["dims"] for i in manifest["inputs"]} == {
        "input_ids": [1, seq], "attention_mask": [1, seq], "token_type_ids": [1, seq]}
    assert manifest["model"]["default_sequence"] == "dynamic"
    v = manifest["verification"]
    assert v["passed"] and v["sizes"] == {"seq": 128} and "longest" in v["policy"]
    # 1, 37 and the longest within 8x the example's cost (all of 1..256 here)
    assert {s["sizes"]["seq"] for s in v["shapes"]} == {1, ODD_LENGTH, MAX_LEN}
    assert all(s["passed"] for s in v["shapes"]) and v["not_checked"] is None

    compiled = slimc.load(result.output)
    generator = torch.Generator().manual_seed(3)
    for length in (9, 200):
        ids = torch.randint(0, TEXT["vocab_size"], (1, length), generator=generator)
        mask = torch.ones(1, length, dtype=torch.int64)
        mask[0, length - 2:] = 0
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        got = compiled(input_ids=ids, attention_mask=mask)["last_hidden_state"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_fixed_default_and_explicit_shapes_stay_fixed(hf_dir, cli, tmp_path, monkeypatch):
    # conftest sets SLIMC_DEFAULT_SEQUENCE=fixed: the example length, no dims
    import json

    result = cli("compile", hf_dir("bert"), "-o", tmp_path / "f", "-q")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert all("dims" not in i for i in manifest["inputs"])
    assert manifest["model"]["default_sequence"] == "fixed"
    # an --input shape wins over a dynamic default
    monkeypatch.setenv("SLIMC_DEFAULT_SEQUENCE", "dynamic")
    result = cli("compile", hf_dir("bert"), "-o", tmp_path / "s", "-q",
                 "--input", "input_ids=1x16:int64")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert all("dims" not in i and i["shape"] == [1, 16] for i in manifest["inputs"])
    assert manifest["model"]["default_sequence"] is None


def test_bad_sequence_setting_is_a_usage_error(hf_dir, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMC_DEFAULT_SEQUENCE", "sometimes")
    result = cli("compile", hf_dir("bert"), "-o", tmp_path / "x")
    assert result.code == 2 and "Traceback" not in result.err
    assert "SLIMC_DEFAULT_SEQUENCE" in result.err and "fixed" in result.err


def test_default_bound_is_capped(monkeypatch):
    from slimc.loaders.huggingface import _sequence_overrides

    monkeypatch.setenv("SLIMC_DEFAULT_SEQUENCE", "dynamic")
    config = T.LlamaConfig(max_position_embeddings=32768)
    inputs = {"input_ids": torch.zeros(1, 128, dtype=torch.int64),
              "attention_mask": torch.ones(1, 128, dtype=torch.int64)}
    overrides = _sequence_overrides({}, inputs, ["input_ids", "attention_mask"], config)
    assert overrides["input_ids"].ranges[1].max == MAX_DEFAULT_SEQUENCE
    assert overrides["attention_mask"].ranges == overrides["input_ids"].ranges


def test_unknown_setting_raises_usage_error(monkeypatch):
    from slimc.loaders.huggingface import default_sequence

    monkeypatch.setenv("SLIMC_DEFAULT_SEQUENCE", "both")
    with pytest.raises(UsageError, match="neither"):
        default_sequence()


# -- the verify-size policy ------------------------------------------------------------------

def test_cost_fit_is_exact_for_a_quadratic():
    def true(n):
        return 5.0 + 3.0 * n + 0.25 * n * n

    cost = fit_cost({n: true(n) for n in (1, 37, 128)})
    for n in (2, 64, 500, 4096):
        assert cost(n) == pytest.approx(true(n), rel=1e-9)


def test_longest_length_within_the_cost_ratio():
    def linear(n):
        return float(n)

    assert longest_within(linear, 128, 4096) == int(COST_RATIO * 128)
    assert longest_within(linear, 128, 512) == 512  # the whole range is affordable

    def quadratic(n):
        return float(n * n)

    longest = longest_within(quadratic, 100, 10_000)
    assert quadratic(longest) <= COST_RATIO * quadratic(100) < quadratic(longest + 1)


def test_plan_clamps_into_bounds_and_reports_what_is_left_out():
    def linear(n):
        return float(n)

    plan = plan_lengths("seq", 128, 1, 4096, linear)
    assert [n for n, _ in plan.lengths] == [128, 1, ODD_LENGTH, 1024]
    assert plan.not_checked.startswith("seq 1025..4096")
    short = plan_lengths("seq", 16, 4, 16, linear)  # 1 -> 4, 37 -> 16 (the example)
    assert [n for n, _ in short.lengths] == [16, 4] and short.not_checked is None


def test_analyze_measures_at_a_fixed_length_under_the_dynamic_default(hf_dir, dynamic_default,
                                                                       tmp_path):
    from slimc.analyze import AnalyzeOptions, analyze_model

    result = analyze_model(hf_dir("bert"), AnalyzeOptions(
        criteria=["magnitude"], seq_len=16, output=tmp_path / "a"))
    assert not result.ir.is_dynamic
    assert result.ir.input_specs()[0].shape[-1] == 16


def test_gpu_backends_and_generation_keep_the_fixed_default(monkeypatch):
    from slimc.backend import get_backend
    from slimc.compiler import _default_sequence

    monkeypatch.delenv("SLIMC_DEFAULT_SEQUENCE")
    cpu, cuda = get_backend("tvm-cpu"), get_backend("tvm-cuda")
    assert _default_sequence(cpu, slimc.CompileOptions()) is None  # the loader's: dynamic
    assert _default_sequence(cpu, slimc.CompileOptions(generate=True)) == "fixed"
    assert _default_sequence(cuda, slimc.CompileOptions()) == "fixed"
    monkeypatch.setenv("SLIMC_DEFAULT_SEQUENCE", "dynamic")
    assert _default_sequence(cuda, slimc.CompileOptions()) is None


def test_roberta_style_position_offset_bounds_the_default_sequence(dynamic_default, cli,
                                                                    tmp_path):
    """XLM-R numbers positions from ``padding_idx + 1``: its 64-row table holds 62 tokens. The
    default dynamic sequence stops there (the verification's longest length indexed past the
    table: an internal error), and a longer explicit shape is a usage error naming 62."""
    import json

    torch.manual_seed(0)
    model = T.XLMRobertaModel(T.XLMRobertaConfig(**TEXT, pad_token_id=1)).eval()
    folder = tmp_path / "xlmr"
    model.save_pretrained(folder)
    result = cli("compile", folder, "-o", tmp_path / "out", "-q")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    dims = {i["name"]: i["dims"] for i in manifest["inputs"]}
    assert dims["input_ids"][1]["max"] == TEXT["max_position_embeddings"] - 2
    assert manifest["verification"]["passed"]
    compiled = slimc.load(tmp_path / "out")
    ids = torch.randint(2, TEXT["vocab_size"], (1, 62))
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state.numpy()
    np.testing.assert_allclose(compiled(input_ids=ids, attention_mask=torch.ones_like(ids))[
        "last_hidden_state"], want, rtol=1e-4, atol=1e-4)
    result = cli("compile", folder, "-o", tmp_path / "long", "-q",
                 "--input", "input_ids=1x64:int64")
    assert result.code == 2 and "62" in result.err and "Traceback" not in result.err
