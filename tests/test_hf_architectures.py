"""Architectures found failing by the issue-16 hunt (benchmarks/hf_probe.py), with the causes
fixed: real Hugging Face classes, tiny configs, random weights, real TVM builds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

import slimc
from slimc.capture import capture, load_model
from slimc.errors import CaptureError
from slimc.loaders.base import parse_overrides

TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            vocab_size=64, max_position_embeddings=32)


class _IntegerArithmetic(torch.nn.Module):
    """Integer tensors meeting float scalars and true division, as position code writes them."""

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        buckets = torch.log(pos.abs() / 3 + 1)  # int64 / int -> float (DeBERTa-v2's buckets)
        halves = pos * 0.5 - 0.25  # int64 * float -> float, not 0 * pos
        below = (pos < 2.5).to(torch.float32)  # compared as floats: 2 < 2.5
        return buckets + halves + below


def test_integer_operands_promote_as_in_torch(tmp_path):
    """TVM turned a Python scalar into the integer tensor's dtype and divided integers as
    integers; the artifact now computes what torch does."""
    pos = torch.arange(-6, 7, dtype=torch.int64).reshape(1, 13)
    module = _IntegerArithmetic().eval()
    result = slimc.compile(module, (pos,), output=tmp_path / "ints")
    got = next(iter(slimc.load(result.output)(pos.numpy()).values()))
    np.testing.assert_allclose(got, module(pos).numpy(), rtol=1e-5, atol=1e-6)


def test_deberta_v2_log_bucket_relative_positions_compile(tmp_path):
    """DeBERTa-v3's config (log-bucketed relative positions, shared keys, no absolute
    positions) failed to import: ``relax.log`` of an int64 tensor."""
    torch.manual_seed(0)
    config = T.DebertaV2Config(**TINY, relative_attention=True, pos_att_type=["p2c", "c2p"],
                               position_buckets=8, norm_rel_ebd="layer_norm",
                               share_att_key=True, position_biased_input=False)
    model = T.DebertaV2Model(config).eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    result = slimc.compile(model, (ids,), output=tmp_path / "deberta")
    assert result.manifest["verification"]["passed"]
    got = slimc.load(result.output)(ids.numpy())["last_hidden_state"]
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def deberta_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = T.DebertaConfig(**TINY, relative_attention=True, pos_att_type=["p2c", "c2p"])
    config.architectures = ["DebertaModel"]
    folder = tmp_path_factory.mktemp("deberta") / "deberta"
    T.DebertaModel(config).eval().save_pretrained(folder)
    return str(folder)


def test_value_sized_default_dynamic_length_falls_back_to_fixed(deberta_dir, dynamic_default):
    """DeBERTa's span ``min(seq, max_relative_positions)`` is read back with ``.item()`` under
    a dynamic length: sizes from tensor values, which TVM cannot import ("cannot lower op(s)
    sym_not, sym_min ..."). slimc chose that length, so it compiles the fixed one instead."""
    loaded = load_model(deberta_dir)
    assert loaded.extra["default_sequence"] == "dynamic"
    ir, _ = capture(loaded)
    sequence = ir.annotations["source"]["default_sequence"]
    assert sequence.startswith("fixed (") and "tensor values" in sequence
    shapes = [tuple(n.meta["val"].shape) for n in ir.nodes("placeholder")
              if ir._is_user_input(n)]
    assert shapes and all(all(isinstance(d, int) for d in s) for s in shapes)


def test_value_sized_dynamic_length_asked_for_is_a_usage_error(deberta_dir):
    """A dynamic range the user asked for is not silently dropped: one paragraph, exit 2."""
    loaded = load_model(deberta_dir, parse_overrides(["input_ids=1x1..16:int64"]))
    with pytest.raises(CaptureError) as info:
        capture(loaded)
    assert info.value.exit_code == 2
    assert "tensor *values*" in info.value.message and "modeling_deberta" in info.value.message


class _RelativeSpansAndUnfold(torch.nn.Module):
    """Funnel's descending relative positions and ConvBERT's span convolution (``unfold``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(8, -8, -1).to(x.dtype)  # 16 values; TVM sized it 18
        spans = torch.nn.functional.unfold(x, (5, 1), padding=(2, 0))  # TVM: no im2col
        strided = torch.nn.functional.unfold(x, (3, 2), dilation=(2, 1), padding=(1, 1),
                                             stride=(2, 3))
        return spans * positions + strided.sum()


def test_descending_arange_and_unfold_lower_exactly(tmp_path):
    x = torch.randn(1, 3, 16, 1)
    module = _RelativeSpansAndUnfold().eval()
    result = slimc.compile(module, (x,), output=tmp_path / "spans")
    got = next(iter(slimc.load(result.output)(x.numpy()).values()))
    np.testing.assert_allclose(got, module(x).numpy(), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def convbert_dir(tmp_path_factory):
    """A tiny real ConvBERT: its span-based dynamic convolution ``unfold``s along the sequence,
    which TVM imports only at a fixed length."""
    torch.manual_seed(0)
    config = T.ConvBertConfig(**TINY, embedding_size=16)
    config.architectures = ["ConvBertModel"]
    folder = tmp_path_factory.mktemp("convbert") / "convbert"
    model = T.ConvBertModel(config).eval()
    model.save_pretrained(folder)
    return str(folder), model


def test_default_dynamic_length_that_fails_to_lower_compiles_fixed(convbert_dir, dynamic_default,
                                                                   cli, tmp_path):
    """ConvBERT exported fine with slimc's default dynamic length but failed in TVM (exit 1).
    slimc chose that length, so the compile falls back to the fixed example length, warns,
    records why in the manifest, and writes a verified artifact that matches eager."""
    import json

    path, model = convbert_dir
    result = cli("compile", path, "-o", tmp_path / "cb", "--target", "x86", "-O0")
    assert result.code == 0, result.err
    assert "a dynamic length failed: the TVM" in result.err
    manifest = json.loads((tmp_path / "cb" / "manifest.json").read_text())
    assert manifest["model"]["default_sequence"].startswith("fixed (a dynamic length failed")
    assert manifest["verification"]["passed"]
    assert all("dims" not in i for i in manifest["inputs"])
    length = manifest["inputs"][0]["shape"][1]
    ids = torch.randint(0, TINY["vocab_size"], (1, length), generator=torch.Generator()
                        .manual_seed(1))
    got = slimc.load(tmp_path / "cb")(input_ids=ids)["last_hidden_state"]
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_dynamic_length_asked_for_that_fails_to_lower_is_a_usage_error(convbert_dir, cli,
                                                                       tmp_path):
    """The same failure under a dynamic range the user asked for is not hidden by a fallback:
    one paragraph naming the dimension and the fix, exit 2, no artifact."""
    path, _ = convbert_dir
    result = cli("compile", path, "-o", tmp_path / "cb", "--target", "x86", "-O0",
                 "--input", "input_ids=1x1..16:int64")
    assert result.code == 2, result.err
    assert "dynamic dimensions asked for" in result.err and "fixed shapes" in result.err
    assert "Traceback" not in result.err
    assert not (tmp_path / "cb").exists()


def test_xlm_concatenating_onto_an_empty_cache_compiles(tmp_path):
    """XLM's forward creates a ``DynamicCache`` whose first update concatenates
    ``torch.tensor([])`` (1-D, empty) with the 4-D keys; torch skips the empty operand, TVM's
    concat refused the mixed ranks at import."""
    torch.manual_seed(0)
    config = T.XLMConfig(emb_dim=32, n_layers=1, n_heads=4, vocab_size=64,
                         max_position_embeddings=32)
    model = T.XLMModel(config).eval()
    ids = torch.randint(0, 64, (1, 10))
    result = slimc.compile(model, (ids,), output=tmp_path / "xlm")
    assert result.manifest["verification"]["passed"]
    got = slimc.load(result.output)(ids.numpy())["last_hidden_state"]
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_config_without_a_position_limit_gets_a_default_length(tmp_path):
    """XLNet states ``max_position_embeddings = -1`` (no limit); slimc read it as the length
    and died creating a ``1x-1`` input (exit 1). The default length is used instead."""
    config = T.XLNetConfig(d_model=32, n_layer=1, n_head=4, d_inner=64, vocab_size=128)
    config.architectures = ["XLNetModel"]
    T.XLNetModel(config).save_pretrained(tmp_path / "xlnet")
    loaded = load_model(str(tmp_path / "xlnet"))
    ids = loaded.example_inputs["input_ids"]
    assert ids.dim() == 2 and ids.shape[1] > 1
