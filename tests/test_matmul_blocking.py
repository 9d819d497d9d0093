"""Loop order of large matmuls: attention's run-time operands and L2-sized column blocks.

Attention scores and context products whose per-head output no longer fits in L2 walk each
head's row tiles outside its panels (stack-resident two-vector tiles), and dense layers whose
input and output exceed L2 walk their weight panels in L2-sized blocks. Both must stay exact:
real TVM builds for the AVX-512 target, compared with PyTorch; smaller shapes keep the panel
outside. (Speed: docs/benchmarks.md, wt/attn20.)
"""

from __future__ import annotations

import pytest
import torch
from slimc.backends.tvm.schedules import cpu_matmul

from tests.test_schedules import _check
from tests.test_vision_schedules import _scheduled


@pytest.fixture(autouse=True)
def _separate_kernels(monkeypatch):
    """These tests are about the separate attention matmuls; at their lengths the fused
    attention (``fused_attention``, tests/test_fused_attention.py) would replace them."""
    from slimc.backends.tvm.schedules import fused_attention

    monkeypatch.setattr(fused_attention, "ENABLED", False)


TARGET = "x86-64-v4-vnni"
#: The scores kernel: ``Q @ K^T`` with the scale in its epilogue.
SCORES = "fused_matmul_multiply"


class Attention(torch.nn.Module):
    """Scaled-dot-product attention without projections: ``softmax(Q K^T) V``."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v


def _kernel(kernels: dict[str, str], name: str) -> str:
    return next(t for n, t in kernels.items() if n == name)


def _parallel_loop(text: str) -> str:
    return next(ln for ln in text.splitlines() if "T.parallel(" in ln).split()[1]


def _unrolled_rows(text: str) -> int:
    line = next(ln for ln in text.splitlines() if "T.unroll(T.int64(" in ln)
    return int(line.split("T.unroll(T.int64(")[1].split(")")[0])


def test_attention_scores_walk_each_heads_rows_outside(tmp_path, caplog):
    """256 x 256 scores per head (256 KiB): ``Q @ K^T`` loops heads, row tiles, then key
    panels, with a 4 x 32 tile on the stack (8 x 32 would be a workspace allocation per tile);
    exact vs PyTorch. At 128 tokens (64 KiB a head) the key panels stay outside the rows."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 16) for _ in range(3))
    scores = _kernel(_scheduled(Attention(), (q, k, v), TARGET), SCORES)
    assert _parallel_loop(scores).startswith("i0_i1_0_i2_0_")  # heads, rows, panels
    assert 'scope="local"' not in scores
    assert _unrolled_rows(scores) == 4
    assert "T.vectorized(T.int64(32))" in scores
    _check(Attention(), (q, k, v), tmp_path, caplog, "tiled-matmul", tol=1e-5, target=TARGET)

    short = tuple(torch.randn(1, 2, 128, 16) for _ in range(3))
    assert _parallel_loop(_kernel(_scheduled(Attention(), short, TARGET), SCORES)) \
        .startswith("i0_i2_0_i1_0_")


def test_attention_rows_outside_can_be_switched_off(monkeypatch):
    """``RUNTIME_ROWS_OUTSIDE = False`` (for A/B runs) restores the panel-outside order."""
    monkeypatch.setattr(cpu_matmul, "RUNTIME_ROWS_OUTSIDE", False)
    q = torch.randn(1, 2, 256, 16)
    scores = _kernel(_scheduled(Attention(), (q, q, q), TARGET), SCORES)
    assert _parallel_loop(scores).startswith("i0_i2_0_i1_0_")


def test_attention_with_padded_keys_is_exact(tmp_path, caplog):
    """A key count no vector divides (300: padded to whole vectors) over heads whose scores
    exceed 256 KiB: rows outside, and still exact vs PyTorch."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 3, 300, 32) for _ in range(3))
    kernels = _scheduled(Attention(), (q, k, v), TARGET)
    scores = _kernel(kernels, SCORES)
    assert "T.int64(32), T.int64(320)" in scores  # K^T padded to 320 keys
    assert _parallel_loop(scores).startswith("i0_i1_0_i2_0_")
    _check(Attention(), (q, k, v), tmp_path, caplog, "tiled-matmul", tol=1e-5, target=TARGET)


def test_large_linears_walk_weight_panels_in_column_blocks(tmp_path, caplog):
    """A dense layer over 512 tokens, 256 -> 1024 (input 512 KiB + output 2 MiB, over the 2 MiB
    threshold; weight 1 MiB): two blocks of 16 panels (512 KiB of weight each), each block's
    row tiles outside its panels; exact vs PyTorch with a GELU epilogue. 128 tokens (1 MiB in
    all) keep each panel outside the rows."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU()).eval()
    x = torch.randn(1, 512, 256)
    dense = next(t for n, t in _scheduled(net, (x,), TARGET).items() if "matmul" in n)
    loop = next(ln for ln in dense.splitlines() if "T.parallel(" in ln)
    assert loop.split()[1].startswith("i1_0_0_i0_0_i1_0_1_")  # block, rows, panels
    assert "T.int64(16) *" in dense or "% T.int64(16)" in dense  # 16 panels a block
    _check(net, (x,), tmp_path, caplog, "tiled-matmul", tol=1e-5, target=TARGET)

    small = next(t for n, t in _scheduled(net, (torch.randn(1, 128, 256),), TARGET).items()
                 if "matmul" in n)
    assert _parallel_loop(small).startswith("i1_0_i0_0_")


def test_column_blocks_need_a_weight_wider_than_one_panel(monkeypatch):
    """Blocks are whole panels of at most ``COLUMN_BLOCK_BYTES`` of weight; when one panel
    alone exceeds it there is no block to make and the panel stays outside the rows."""
    monkeypatch.setattr(cpu_matmul, "COLUMN_BLOCK_BYTES", 1024)
    net = torch.nn.Sequential(torch.nn.Linear(256, 1024)).eval()
    dense = next(t for n, t in _scheduled(net, (torch.randn(1, 512, 256),), TARGET).items()
                 if "matmul" in n)
    assert _parallel_loop(dense).startswith("i1_0_i0_0_")


def test_attention_rows_outside_on_neon_tiles():
    """The loop order is shape-driven, not AVX-512-only: on aarch64 (128-bit NEON) the same
    scores walk rows outside with a two-vector (8-lane) tile whose accumulators fit NEON's
    registers (at most 24 of 32 vectors)."""
    q = torch.randn(1, 2, 256, 16)
    scores = _kernel(_scheduled(Attention(), (q, q, q), "raspberry-pi/4b-aarch64"), SCORES)
    assert _parallel_loop(scores).startswith("i0_i1_0_i2_0_")
    assert "T.vectorized(T.int64(8))" in scores
    assert _unrolled_rows(scores) * 8 // 4 <= 24
