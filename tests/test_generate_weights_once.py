"""A generation artifact stores each layer weight once: ``prefill`` (a tiled matmul over many rows)
and ``decode`` (a matrix-vector kernel) read the same packed constants.

Before the GEMV packed fp32 weights into the matmul's panel width, every fp32 layer weight was
stored in two layouts (SmolLM2-135M: a 1027 MiB ``model.so`` for 513 MiB of weights).
"""

from __future__ import annotations

import json

import torch
import transformers as T

from slimc.compiler import CompileOptions, compile_model

#: One layer whose weights (4.2 MB) equal the embedding's (tied LM head), so a second copy of
#: the layer weights would add half the model to the library; kernel code is well under that.
CONFIG = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
              max_position_embeddings=64, tie_word_embeddings=True)


def test_fp32_generation_library_holds_one_copy_of_the_weights(tmp_path):
    torch.manual_seed(0)
    config = T.LlamaConfig(**CONFIG)
    config.architectures = ["LlamaForCausalLM"]
    model_dir = tmp_path / "model"
    T.LlamaForCausalLM(config).eval().save_pretrained(model_dir)
    out = compile_model(str(model_dir), CompileOptions(
        generate=True, output=tmp_path / "out.slimc", threads=2, max_length=32,
        prefill_length=8)).output
    manifest = json.loads((out / "manifest.json").read_text())
    weights, library = manifest["weight_bytes_after"], manifest["library_bytes"]
    embedding = 4 * CONFIG["vocab_size"] * CONFIG["hidden_size"]
    layer_weights = weights - embedding
    assert layer_weights > 0.4 * weights
    # One copy of every weight, plus the tied embedding's LM-head panels (a second layout of
    # that one matrix: the gather reads rows, the head streams panels) and kernel code; a
    # second copy of the layer weights would add half of them again.
    assert library < weights + embedding + 0.5 * layer_weights, (library, weights)
    assert manifest["verification"]["passed"] is True
