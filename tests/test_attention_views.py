"""The fused attention kernel reads ``Q`` / ``V`` from the projections and writes the merged heads.

:mod:`slimc.backends.tvm.schedules.attention_views`: instead of the per-head copies
(``[B, L, H * D] -> [B, H, L, D]`` for ``Q`` and ``V``, and back for the output), the kernel
indexes the projections' outputs with strides and writes its rows where the output projection
reads them; only ``K^T`` keeps a copy (it takes ``Q``'s scale). These tests build real TVM
modules (slimc's pipeline) of attention blocks with their projections and compare with
PyTorch: padding masks with a fully masked row, causal attention, eager attention with a scale
and a position bias, tiny HF T5 / BERT through ``slimc.compile``, long key counts (row blocks
shrunk to keep the scores in L2), the copies back when the views are off, and NEON under qemu.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers as T

from tests.test_fused_attention import _compiled, _fused_calls, _run, _want
from tests.test_lane_reductions import _fused_main, _kernels


class HeadAttention(torch.nn.Module):
    """Projections, the head split, SDPA (optionally masked / causal), the merge, an output
    projection: the layer as HF writes it."""

    def __init__(self, hidden: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q, self.k, self.v, self.o = (torch.nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, x, mask=None):
        b, n, c = x.shape

        def split(t):
            return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

        out = torch.nn.functional.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=mask,
            is_causal=self.causal)
        return self.o(out.transpose(1, 2).reshape(b, n, c))


class EagerHeads(torch.nn.Module):
    """Eager attention with its projections: ``softmax(Q @ K^T * scale + bias) @ V``."""

    def __init__(self, hidden: int, heads: int, length: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (torch.nn.Linear(hidden, hidden) for _ in range(3))
        self.bias = torch.nn.Parameter(torch.randn(1, heads, length, length))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        probs = torch.softmax(q @ k.transpose(-1, -2) * 0.25 + self.bias, -1)
        return (probs @ v).transpose(1, 2).reshape(b, n, c)


def _copies(module, inputs, target: str = "x86-64-v4-vnni") -> list[str]:
    """The calls of ``module``'s main function to kernels that move heads (transposes)."""
    fused, _ = _fused_main(module, inputs, target=target)
    called = re.findall(r"R\.call_tir\((\w+),", fused["main"].script())
    return [n for n in called if "transpose" in n]


def _close(module, inputs, tmp_path, **kw) -> np.ndarray:
    got, want = _run(module, inputs, tmp_path, **kw), _want(module, inputs)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    return got


def test_masked_heads_read_in_place_with_a_masked_row(tmp_path):
    """A padding mask (batch 1 sees 20 of 40 keys) and a fully masked query row: one fused
    kernel, one head copy left (``K^T``), PyTorch's result (zeros through the output
    projection: its bias on the masked row)."""
    torch.manual_seed(0)
    module = HeadAttention(64, 4).eval()
    x = torch.randn(2, 40, 64)
    mask = torch.zeros(2, 1, 40, 40)
    mask[1, ..., 20:] = float("-inf")
    mask[0, :, 5, :] = float("-inf")
    inputs = (x, mask)
    assert _fused_calls(module, inputs)[0] == 1
    assert len(_copies(module, inputs)) == 1, _copies(module, inputs)
    got = _close(module, inputs, tmp_path)
    np.testing.assert_allclose(got[0, 5], module.o.bias.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_causal_heads_and_the_copies_when_views_are_off(tmp_path, monkeypatch):
    """Causal attention over 50 rows (keys padded to 64): exact with the views, and with
    ``HEAD_VIEWS = False`` the Q / V / output copies come back (four head copies, same
    result)."""
    from slimc.backends.tvm.schedules import fused_attention

    torch.manual_seed(1)
    module = HeadAttention(64, 2, causal=True).eval()
    inputs = (torch.randn(1, 50, 64),)
    assert len(_copies(module, inputs)) == 1
    (tmp_path / "views").mkdir()
    (tmp_path / "copies").mkdir()
    got = _close(module, inputs, tmp_path / "views")
    monkeypatch.setattr(fused_attention, "HEAD_VIEWS", False)
    assert len(_copies(module, inputs)) == 4, _copies(module, inputs)
    np.testing.assert_allclose(_close(module, inputs, tmp_path / "copies"), got,
                               rtol=1e-5, atol=1e-6)


def test_eager_scale_and_bias_with_heads_in_place(tmp_path):
    """Eager ``Q @ K^T * 0.25 + bias``, a plain softmax, the merge: fused, the output merge
    written by the kernel, exact."""
    torch.manual_seed(2)
    module = EagerHeads(64, 4, 32).eval()
    inputs = (torch.randn(1, 32, 64),)
    assert _fused_calls(module, inputs)[0] == 1
    assert len(_copies(module, inputs)) == 1, _copies(module, inputs)
    _close(module, inputs, tmp_path)


def test_long_keys_fused_with_short_row_blocks(tmp_path, monkeypatch):
    """Beyond 512 keys (600, padded to 608) the kernel keeps a task's scores at most
    ``SCRATCH_FLOATS`` (row blocks of 52 rows here): fused and exact, with a padding mask."""
    from slimc.backends.tvm.schedules import fused_attention

    torch.manual_seed(3)
    monkeypatch.setattr(fused_attention, "MAX_KEYS", max(fused_attention.MAX_KEYS, 1024))
    module = HeadAttention(32, 2).eval()
    x = torch.randn(1, 600, 32)
    mask = torch.zeros(1, 1, 1, 600)
    mask[..., 550:] = float("-inf")
    inputs = (x, mask)
    fused, _ = _fused_main(module, inputs)
    kernel = _kernels(fused)["fused_attention"].script()
    assert "T.alloc_buffer((52, 608))" in kernel, kernel[:2000]
    _close(module, inputs, tmp_path)


def test_tiny_hf_t5_encoder_through_slimc_compile(tmp_path):
    """HF T5 encoder (eager attention, relative position bias, no scale; 4 heads of 16, 40
    tokens): fused with its heads read in place, hidden states match PyTorch's."""
    torch.manual_seed(4)
    config = T.T5Config(vocab_size=100, d_model=64, d_kv=16, num_heads=4, d_ff=128,
                        num_layers=2)
    model = T.T5EncoderModel(config).eval()
    ids = torch.randint(0, 100, (1, 40))
    assert _fused_calls(model, (ids,))[0] >= 1
    # K^T per layer, and the position bias (once, shared by the layers)
    assert len(_copies(model, (ids,))) == 3, _copies(model, (ids,))
    got = _compiled(model, (ids,), tmp_path)[0]
    with torch.no_grad():
        want = model(ids).last_hidden_state.numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_tiny_hf_bert_heads_in_place(tmp_path):
    """HF BERT (SDPA, 3 layers, a padded second sequence): one head copy per layer, hidden
    states match PyTorch's through ``slimc.compile``."""
    torch.manual_seed(5)
    config = T.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3,
                          num_attention_heads=4, intermediate_size=128,
                          attn_implementation="sdpa")
    model = T.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 33))
    mask = torch.ones(2, 33, dtype=torch.int64)
    mask[1, 20:] = 0
    assert len(_copies(model, (ids, mask))) == 3, _copies(model, (ids, mask))
    got = _compiled(model, (ids, mask), tmp_path)[0]
    with torch.no_grad():
        want = model(ids, mask).last_hidden_state.numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_heads_in_place_on_aarch64_under_qemu(causal, tmp_path, aarch64_emulator):
    """NEON (4 lanes): the projection block with a masked row (or causal), 30 keys padded to
    32, cross-built and run under qemu, against PyTorch."""
    torch.manual_seed(6)
    module = HeadAttention(32, 4, causal=causal).eval()
    x = torch.randn(1, 30, 32)
    if causal:
        inputs = (x,)
    else:
        mask = torch.zeros(1, 1, 30, 30)
        mask[..., 3, :] = float("-inf")
        mask[..., 25:] = float("-inf")
        inputs = (x, mask)
    assert _fused_calls(module, inputs, target="arm")[0] == 1
    assert len(_copies(module, inputs, target="arm")) == 1
    _close(module, inputs, tmp_path, target="arm", cross="aarch64-linux-gnu")
