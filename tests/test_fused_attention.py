"""Short attentions run as one fused kernel (``softmax(Q @ K^T ...) @ V``), results exact.

:mod:`slimc.backends.tvm.schedules.fused_attention` replaces the ``Q @ K^T`` matmul, the row
softmax and the ``P @ V`` matmul of attentions of up to ``MAX_KEYS`` keys with one kernel that
keeps each block of score rows in a scratch. These tests build real TVM modules (slimc's
pipeline) and compare with PyTorch: plain SDPA (whole-vector and padded key counts, row tails),
additive masks that mask some keys and whole rows (SDPA's safe softmax gives zeros there),
causal attention, T5-style position bias, tiny HF BERT (padding mask) and ViT through
``slimc.compile``, the separate kernels kept where the kernel does not apply, and NEON under
qemu.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

import slimc
from tests.test_lane_reductions import Attention, _fused_main, _kernels
from tests.test_schedules import _build_run


class MaskedAttention(torch.nn.Module):
    """SDPA with an additive float mask (broadcast over heads, as HF's padding mask)."""

    def forward(self, q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class CausalAttention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


class EagerBiased(torch.nn.Module):
    """T5's eager attention: no scale, a position bias, a plain softmax."""

    def __init__(self, heads: int, length: int) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(1, heads, length, length))

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) + self.bias, -1) @ v


class EagerScaledMasked(torch.nn.Module):
    """HF eager attention: ``softmax(Q @ K^T / sqrt(d) + mask) @ V`` (a scalar step, then a
    mask step, between the matmul and the softmax)."""

    def forward(self, q, k, v, mask):
        return torch.softmax(q @ k.transpose(-1, -2) / 4.0 + mask, -1) @ v


def _fused_calls(module, inputs, target: str = "x86-64-v4-vnni") -> tuple[int, list[str]]:
    """(fused attention kernels, softmax kernels) of ``module``'s fused Relax module."""
    fused, _ = _fused_main(module, inputs, target=target)
    names = list(_kernels(fused))
    return sum(n.startswith("fused_attention") for n in names), \
        [n for n in names if "softmax" in n]


def _run(module, inputs, tmp_path, **kw) -> np.ndarray:
    got, _ = _build_run(module, inputs, tmp_path, **kw)
    return got[0]


def _want(module, inputs) -> np.ndarray:
    with torch.no_grad():
        return module(*inputs).numpy()


@pytest.mark.parametrize("shape", [(4, 128, 64), (3, 197, 64), (2, 30, 16), (1, 7, 32)])
def test_sdpa_is_one_kernel_and_matches_torch(shape, tmp_path):
    """Whole-vector keys (128), padded keys with a row tail (197 -> 208 keys, 197 rows), short
    rows (30, 7 keys): one fused kernel, no softmax kernel left, PyTorch's result."""
    torch.manual_seed(0)
    heads, length, width = shape
    inputs = tuple(torch.randn(2, heads, length, width) for _ in range(3))
    module = Attention()
    count, softmaxes = _fused_calls(module, inputs)
    assert count == 1 and softmaxes == []
    np.testing.assert_allclose(_run(module, inputs, tmp_path), _want(module, inputs),
                               rtol=1e-5, atol=2e-6)


def test_additive_mask_with_masked_keys_and_a_masked_row(tmp_path):
    """A padding mask over keys (batch 1 sees 20 of 40) and one query row whose keys are all
    ``-inf``: SDPA's safe softmax gives that row zeros, the others match PyTorch."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 40, 16) for _ in range(3))
    mask = torch.zeros(2, 1, 40, 40)
    mask[1, :, :, 20:] = float("-inf")
    mask[0, :, 5, :] = float("-inf")
    inputs = (q, k, v, mask)
    module = MaskedAttention()
    assert _fused_calls(module, inputs)[0] == 1
    got, want = _run(module, inputs, tmp_path), _want(module, inputs)
    assert not got[0, :, 5].any()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


def test_causal_attention_matches_torch(tmp_path):
    """``is_causal``: each query sees only its past (the first row one key)."""
    torch.manual_seed(2)
    inputs = tuple(torch.randn(1, 4, 50, 32) for _ in range(3))
    module = CausalAttention()
    got, want = _run(module, inputs, tmp_path), _want(module, inputs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(got[0, :, 0], inputs[2][0, :, 0].numpy(), rtol=1e-5, atol=1e-6)


def test_position_bias_plain_softmax_is_fused(tmp_path):
    """T5's eager form (a constant position bias, a plain softmax) runs fused and exact."""
    torch.manual_seed(3)
    module = EagerBiased(4, 64).eval()
    inputs = tuple(torch.randn(1, 4, 64, 32) for _ in range(3))
    assert _fused_calls(module, inputs)[0] == 1
    np.testing.assert_allclose(_run(module, inputs, tmp_path), _want(module, inputs),
                               rtol=1e-5, atol=2e-6)


def test_eager_scale_and_mask_are_fused(tmp_path):
    """A scale after ``Q @ K^T`` and a padding mask (eager attention): fused and exact."""
    torch.manual_seed(8)
    q, k, v = (torch.randn(2, 4, 48, 16) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 48)
    mask[1, ..., 30:] = float("-inf")
    module, inputs = EagerScaledMasked(), (q, k, v, mask)
    assert _fused_calls(module, inputs)[0] == 1
    np.testing.assert_allclose(_run(module, inputs, tmp_path), _want(module, inputs),
                               rtol=1e-5, atol=2e-6)


def test_long_or_odd_width_attentions_keep_the_separate_kernels(tmp_path):
    """More than ``MAX_KEYS`` keys (the tuned separate kernels) and a head
    width that is not whole vectors (8 of 16 lanes) are not fused, and stay exact."""
    from slimc.backends.tvm.schedules import fused_attention

    torch.manual_seed(4)
    long = tuple(torch.randn(1, 1, fused_attention.MAX_KEYS + 16, 16) for _ in range(3))
    narrow = tuple(torch.randn(1, 2, 64, 8) for _ in range(3))
    for inputs in (long, narrow):
        count, softmaxes = _fused_calls(Attention(), inputs)
        assert count == 0 and softmaxes
    np.testing.assert_allclose(_run(Attention(), narrow, tmp_path), _want(Attention(), narrow),
                               rtol=1e-5, atol=2e-6)


def _compiled(model, inputs, tmp_path) -> list[np.ndarray]:
    result = slimc.compile(model, inputs, output=tmp_path / "out", cache=False)
    outputs = slimc.load(result.output)(*[x.numpy() for x in inputs])
    return list(outputs.values())


def test_tiny_hf_bert_with_padding_through_slimc_compile(tmp_path):
    """HF BERT (SDPA attention, 4 heads of 16, 24 tokens, the second sequence padded after 15
    tokens) through ``slimc.compile``: fused, hidden states match PyTorch's."""
    torch.manual_seed(5)
    config = T.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=128,
                          attn_implementation="sdpa")
    model = T.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.int64)
    mask[1, 15:] = 0
    assert _fused_calls(model, (ids, mask))[0] >= 1
    got = _compiled(model, (ids, mask), tmp_path)[0]
    with torch.no_grad():
        want = model(ids, mask).last_hidden_state.numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_tiny_hf_vit_through_slimc_compile(tmp_path):
    """HF ViT (17 tokens: 16 patches + CLS, keys padded to whole vectors) through
    ``slimc.compile``: fused, hidden states match PyTorch's."""
    torch.manual_seed(6)
    config = T.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=128,
                         attn_implementation="sdpa")
    model = T.ViTModel(config, add_pooling_layer=False).eval()
    pixels = torch.randn(1, 3, 32, 32)
    assert _fused_calls(model, (pixels,))[0] >= 1
    got = _compiled(model, (pixels,), tmp_path)[0]
    with torch.no_grad():
        want = model(pixels).last_hidden_state.numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_fused_attention_on_aarch64_under_qemu(tmp_path, aarch64_emulator):
    """NEON (4 lanes): masked SDPA over 30 keys (padded to 32) with a fully masked row, and
    T5's biased form, cross-built and run under qemu, against PyTorch."""
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))
    mask = torch.zeros(1, 1, 30, 30)
    mask[..., 3, :] = float("-inf")
    mask[..., 20:] = float("-inf")
    cases = [(MaskedAttention(), (q, k, v, mask)),
             (EagerBiased(2, 64).eval(), tuple(torch.randn(1, 2, 64, 8) for _ in range(3)))]
    for module, inputs in cases:
        assert _fused_calls(module, inputs, target="arm")[0] == 1
        got = _run(module, inputs, tmp_path, target="arm", cross="aarch64-linux-gnu")
        np.testing.assert_allclose(got, _want(module, inputs), rtol=1e-5, atol=2e-6)


def test_register_tiles_fit_the_register_file():
    """AVX-512 / NEON (32 registers) keep the 4 x 4 and 4 x width tiles; 16-register targets
    (AVX2) get 4 x 2 tiles, ``P @ V`` in whole chunks of the head width."""
    from slimc.backends.tvm.schedules.fused_attention import register_tiles

    assert register_tiles(32, 4) == (4, 4, 4)
    assert register_tiles(16, 8) == (4, 2, 2)
    assert register_tiles(16, 1) == (4, 2, 1)


@pytest.mark.parametrize("shape", [(3, 197, 64), (2, 30, 16), (1, 7, 8)])
def test_avx2_tiles_match_torch(shape, tmp_path):
    """The 16-register tiles (``x86-64-v3``): padded keys and row tails past the 4-row tiles
    (197 rows), ``P @ V`` in blocks of 64 keys with a partial last one (197 keys), head
    widths of 8 chunks of vectors, 2 and 1; one fused kernel."""
    torch.manual_seed(1)
    heads, length, width = shape
    inputs = tuple(torch.randn(2, heads, length, width) for _ in range(3))
    module = Attention()
    count, softmaxes = _fused_calls(module, inputs, target="x86-64-v3")
    assert count == 1 and softmaxes == []
    np.testing.assert_allclose(_run(module, inputs, tmp_path, target="x86-64-v3"),
                               _want(module, inputs), rtol=1e-5, atol=2e-6)
