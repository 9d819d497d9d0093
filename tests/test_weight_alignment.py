"""Weights reach TVM zero-copy: lowering makes every IR weight 64-byte aligned, same values.

A Hugging Face model loaded from safetensors has its weights at 8-byte offsets of the mapped
file, which TVM's importer silently copies (one extra copy of the whole model while building).
"""

from __future__ import annotations

import torch
from slimc.backends.tvm.weights import ALIGNMENT, align_weights, aligned

from slimc.capture import capture, load_model
from slimc.loaders.base import parse_overrides
from slimc.plugins import get_registry


def _captured(model_dir: str):
    ir, _ = capture(load_model(model_dir, parse_overrides(
        ["input_ids=1x8:int64", "attention_mask=1x8:int64"]),
                               get_registry()))
    return ir


def test_align_weights_keeps_values_and_shared_storage(hf_dir):
    ir = _captured(hf_dir("gpt2"))  # GPT-2 ties its LM head to the token embedding
    before = {k: v.clone() for k, v in ir.weights().items()}
    storages_before = {k: v.untyped_storage().data_ptr() for k, v in ir.weights().items()}
    align_weights(ir)
    after = ir.weights()
    assert after.keys() == before.keys()
    for name, value in after.items():
        assert aligned(value) and value.data_ptr() % ALIGNMENT == 0, name
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    # weights that shared one storage before still share one after
    groups: dict[int, set[int]] = {}
    for name, ptr in storages_before.items():
        groups.setdefault(ptr, set()).add(after[name].untyped_storage().data_ptr())
    assert all(len(ptrs) == 1 for ptrs in groups.values())
    assert align_weights(ir) == 0  # idempotent


def test_the_ir_still_runs_after_alignment(hf_dir):
    ir = _captured(hf_dir("llama"))
    inputs = [torch.randint(0, 100, (1, 8)), torch.ones(1, 8, dtype=torch.int64)]
    want = [o.clone() for o in ir.run(inputs)]
    align_weights(ir)
    got = ir.run(inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
