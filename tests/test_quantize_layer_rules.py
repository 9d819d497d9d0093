"""``quantize{layers=PATTERN=FORMAT}``: a rule that matches no layer is an error naming the
layer that was probably meant (it used to be ignored silently: on MiniLM, whose layers are
``transformer.embeddings...``, ``layers=embeddings.word_embeddings=int2-g64`` changed
nothing)."""

from __future__ import annotations

import pytest

from slimc.capture import capture, load_model
from slimc.errors import UsageError
from slimc.loaders.base import parse_overrides
from slimc.passmanager import AnalysisManager, PassContext, PassManager
from slimc.pipeline import parse_pipeline_text, validate
from slimc.plugins import get_registry


def _quantized_bytes(model_dir: str, pipeline: str) -> int:
    registry = get_registry()
    ir, example = capture(load_model(model_dir, parse_overrides([]), registry))
    ctx = PassContext(example_inputs=example)
    manager = PassManager(registry.passes)
    ctx.analyses = AnalysisManager(ir, ctx, manager.lookup)
    manager.run(ir, validate(parse_pipeline_text(pipeline), registry.passes), ctx)
    return ir.weight_bytes()


def test_full_layer_name_rule_applies(hf_dir):
    model = hf_dir("bert")
    plain = _quantized_bytes(model, "quantize{weights=int8}")
    ruled = _quantized_bytes(model, "quantize{weights=int8,"
                                    "layers=embeddings.word_embeddings=int2-g64}")
    globbed = _quantized_bytes(model, "quantize{weights=int8,layers=*word_embeddings=int2-g64}")
    assert ruled < plain and globbed == ruled


def test_rule_matching_no_layer_is_a_usage_error(hf_dir):
    with pytest.raises(UsageError) as info:
        _quantized_bytes(hf_dir("bert"), "quantize{weights=int8,layers=word_embeddings=int2-g64}")
    text = str(info.value) + " " + (info.value.hint or "")
    assert "'word_embeddings' matches none" in text
    assert "embeddings.word_embeddings" in info.value.hint


def test_cli_exits_2_on_unmatched_rule(cli, hf_dir, tmp_path):
    result = cli("compile", hf_dir("bert"), "--pipeline",
                 "quantize{weights=int8,layers=nosuchlayer=int4-g32}", "-o", tmp_path / "x",
                 "--no-cache")
    assert result.code == 2
    assert "matches none" in result.err and "Traceback" not in result.err


def test_several_rules_in_brackets_in_pipeline_text(hf_dir):
    """Pipeline text separates options with commas: a rule list goes in brackets, and each
    rule in it applies (unbracketed, the second rule was read as an unknown option)."""
    model = hf_dir("bert")
    first = _quantized_bytes(model, "quantize{weights=int8,layers=*word_embeddings=int2-g64}")
    both = _quantized_bytes(model, "quantize{weights=int8,"
                                   "layers=[*word_embeddings=int2-g64,*.[qk]*=int4-g32]}")
    assert both < first
    with pytest.raises(UsageError):
        _quantized_bytes(model, "quantize{weights=int8,"
                                "layers=*word_embeddings=int2-g64,*query=int4-g32}")
