"""Transforms on architectures the transform probe (benchmarks/transform_probe.py) found
failing: real Hugging Face classes, tiny configs, random weights, real TVM builds."""

from __future__ import annotations

import json

import torch
import transformers as T


def _save(model: torch.nn.Module, path) -> str:
    model.config.architectures = [type(model).__name__]
    model.eval().save_pretrained(path)
    return str(path)


def _tiny_moe(path) -> str:
    """A saved tiny Qwen2-MoE: two experts, a shared expert and its one-output gate."""
    torch.manual_seed(0)
    config = T.Qwen2MoeConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, intermediate_size=32, vocab_size=64,
                              max_position_embeddings=32, moe_intermediate_size=32,
                              shared_expert_intermediate_size=32, num_experts=2,
                              num_experts_per_tok=1)
    return _save(T.Qwen2MoeForCausalLM(config), path)


def test_block_pruning_drops_the_removed_blocks_weights(cli, tmp_path):
    """Phi-3's blocks end in ``dropout`` (kept by an eval export with train=False); torch's
    dead-code elimination keeps random ops, so a removed block's attention and MLP stayed in
    the graph with their weights: the manifest named the block removed, the artifact stored
    every byte of it and the parameter count did not move."""
    torch.manual_seed(0)
    config = T.Phi3Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=32, vocab_size=64,
                          max_position_embeddings=32, pad_token_id=0, eos_token_id=0,
                          bos_token_id=0)
    model_dir = _save(T.Phi3ForCausalLM(config), tmp_path / "phi3")
    out = tmp_path / "out"
    result = cli("compile", model_dir, "--input", "input_ids=1x8:int64", "-p",
                 "prune{ratio=0.5,granularity=block}", "-o", out, "--json", "-q")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["verification"]["passed"]
    prune = summary["pipeline"][0]
    removed = prune["summary"]["removed_blocks"] if isinstance(prune["summary"], dict) else None
    layer_params = sum(p.numel() for p in model_layer(model_dir).parameters())
    assert summary["params_before"] - summary["params_after"] >= layer_params, (removed, summary)
    assert summary["weight_bytes_after"] < summary["weight_bytes_before"]


def model_layer(model_dir: str) -> torch.nn.Module:
    return T.Phi3ForCausalLM.from_pretrained(model_dir).model.layers[0]


def mobilevit():
    """A tiny MobileViT (the factory ``load_model`` reads)."""
    torch.manual_seed(0)
    config = T.MobileViTConfig(image_size=64, hidden_sizes=[16, 24, 32],
                               neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                               num_attention_heads=2, initializer_range=0.2)
    model = T.MobileViTModel(config).eval()
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model, {"pixel_values": pixels}


def test_mobilevit_channel_pruning_runs(tmp_path):
    """MobileViT unfolds patches with transpose -> pointwise -> ``view``; the pruning pass
    replays shape ops on its label tensors, where the transpose stays a strided view, and
    ``view`` refused it (RuntimeError, exit 1) before any channel was chosen. Checked on the
    IR (the pass is what failed; a TVM build of MobileViT takes minutes on 2 cores): weights
    removed, the pruned IR still runs and keeps its output shapes."""
    from slimc.capture import capture, load_model
    from slimc.passmanager import PassContext, PassManager
    from slimc.pipeline import parse_pipeline_text, validate
    from slimc.plugins import get_registry

    registry = get_registry()
    ir, inputs = capture(load_model("tests.test_transform_probe:mobilevit"))
    before = [tuple(o.shape) for o in ir.run(inputs)]
    params_before = sum(ir.get_weight(n).numel() for n in ir.nodes("placeholder")
                        if ir.placeholder_spec(n).kind.name != "USER_INPUT")
    pipeline = validate(parse_pipeline_text("prune{ratio=0.3}"), registry.passes)
    PassManager(registry.passes).run(ir, pipeline, PassContext(example_inputs=inputs))
    params_after = sum(ir.get_weight(n).numel() for n in ir.nodes("placeholder")
                       if ir.placeholder_spec(n).kind.name != "USER_INPUT")
    assert params_after < 0.9 * params_before
    got = ir.run(inputs)
    assert [tuple(o.shape) for o in got] == before
    assert all(torch.isfinite(o).all() for o in got)


def test_lowrank_ranks_naming_no_layer_is_a_usage_error(cli, tmp_path):
    """``lowrank{ranks=...}`` with a layer name the model does not have factorized nothing
    and compiled as if nothing had been asked (exit 0): now one paragraph, exit 2, no
    artifact, with the full name it probably meant."""
    torch.manual_seed(0)
    config = T.Qwen3Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=8, intermediate_size=32,
                           vocab_size=64, max_position_embeddings=32)
    model_dir = _save(T.Qwen3ForCausalLM(config), tmp_path / "qwen3")
    out = tmp_path / "out"
    result = cli("compile", model_dir, "--input", "input_ids=1x8:int64", "-p",
                 "lowrank{ranks=q_proj=4}", "-o", out, "-q")
    assert result.code == 2, result.err
    assert "Traceback" not in result.err
    assert "does not have (q_proj)" in result.err
    assert "model.layers.0.self_attn.q_proj" in result.err
    assert not out.exists()


def test_binary_calibration_file_is_a_usage_error(cli, tmp_path):
    """A binary file given as --calib text (a weights file, bytes under .txt) was decoded with
    replacement characters and calibrated on (exit 0, an artifact tuned on noise)."""
    torch.manual_seed(0)
    config = T.Qwen3Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=8, intermediate_size=32,
                           vocab_size=64, max_position_embeddings=32)
    model_dir = _save(T.Qwen3ForCausalLM(config), tmp_path / "qwen3")
    calib = tmp_path / "calib.txt"
    calib.write_bytes(bytes(range(256)) * 8)
    out = tmp_path / "out"
    result = cli("compile", model_dir, "--input", "input_ids=1x8:int64", "-p",
                 "prune{ratio=0.3}", "--calib", calib, "-o", out, "-q")
    assert result.code == 2, result.err
    assert "Traceback" not in result.err
    assert "is not UTF-8 text" in result.err and "binary" in result.err
    assert not out.exists()


def test_int4_layer_with_one_output_compiles_at_several_rows(cli, tmp_path):
    """Qwen2-MoE's shared-expert gate is a linear with one output: its int4 kernel has
    one-lane tiles, and with 16 rows the row-block schedule unpacked three loops where TVM had
    left two (ValueError at the TVM import, exit 1)."""
    model_dir = _tiny_moe(tmp_path / "moe")
    result = cli("compile", model_dir, "--input", "input_ids=1x16:int64", "-p",
                 "quantize{weights=int4,group_size=32}", "-o", tmp_path / "out", "--json",
                 "-q")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["verification"]["passed"]
    per_layer = summary["pipeline"][0]["summary"]["per_layer"]
    assert per_layer["model.layers.0.mlp.shared_expert_gate"]["format"].startswith("int4")


def test_experts_with_float16_scales_import(cli, tmp_path):
    """Batched experts in a ``-fz`` format (float16 group scales and minimums: int3, and the
    int4 formats ``-O2`` picks) gathered through ``expert_gather_int4``: its fake said float16
    (the scales' dtype) where the kernel dequantizes to float32, so the expert ``bmm`` met a
    float32 activation at the TVM import (RuntimeError, exit 1; Qwen2-MoE ``-O2``)."""
    model_dir = _tiny_moe(tmp_path / "moe")
    result = cli("compile", model_dir, "--input", "input_ids=1x16:int64", "-p",
                 "quantize{weights=int3}", "-o", tmp_path / "out", "--json", "-q")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["verification"]["passed"]
    per_layer = summary["pipeline"][0]["summary"]["per_layer"]
    experts = [name for name in per_layer if "experts" in name]
    # float16 scales: the experts take an int4 -fz format (no int3 expert kernel)
    assert experts and all(per_layer[name]["format"].endswith("-fz") for name in experts)
