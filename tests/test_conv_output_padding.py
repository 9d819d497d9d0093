"""Dense convs to channel counts no whole vector divides compute padded outputs and slice
(``conv_output_padding``): ShuffleNetV2's 232-channel 1 x 1 convs over 7 x 7 pixels ran on
8-lane panels on AVX-512. Real TVM builds, compared with PyTorch."""

from __future__ import annotations

import torch

from tests.test_schedules import _check
from tests.test_vision_schedules import _kernel_names, _randomize_bn, _scheduled


def test_padded_channel_counts():
    from slimc.backends.tvm.schedules.conv_output_padding import padded_channels

    assert padded_channels(232, 16, True) == 256  # two vectors: +10%
    assert padded_channels(244, 16, True) == 256
    assert padded_channels(136, 16, True) == 144  # one vector: +6% (two would add 18%)
    assert padded_channels(240, 16, True) is None  # whole vectors already
    assert padded_channels(24, 16, True) is None  # a third more work: left alone
    assert padded_channels(232, 16, False) is None  # Zen 4: 8-lane panels lose nothing
    assert padded_channels(116, 8, True) == 128  # AVX2: 4-lane panels otherwise


class ShuffleUnit(torch.nn.Module):
    """ShuffleNetV2's stage-4 unit over 7 x 7 pixels: one branch's 1 x 1 conv + BN + ReLU to
    232 channels, concatenated with the other half and channel-shuffled."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(240, 232, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(232)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        z = torch.cat((other, y), 1)
        n, c, h, w = z.shape
        return z.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


def test_shuffle_unit_conv_runs_whole_vectors_and_is_exact(tmp_path, caplog):
    """The conv computes 256 channels (zero filters past 232) with its folded batch norm and
    ReLU, the slice back to 232 fuses into a kernel, and the unit matches PyTorch."""
    torch.manual_seed(0)
    net = _randomize_bn(ShuffleUnit()).eval()
    inputs = (torch.randn(1, 240, 7, 7), torch.randn(1, 232, 7, 7))
    names = _kernel_names(net, inputs, "x86-64-v4-vnni")
    assert any("conv2d" in n and "strided_slice" in n for n in names), names
    conv = next(t for n, t in _scheduled(net, inputs).items() if "conv2d" in n)
    assert "T.int64(1), T.int64(1), T.int64(240), T.int64(256)" in conv, conv[:1500]  # HWIO
    assert "T.vectorized(T.int64(8))" not in conv
    _check(net, inputs, tmp_path, caplog, None, tol=1e-5, target="x86-64-v4-vnni")


class ConvResidual(torch.nn.Module):
    """A 3 x 3 conv to 232 channels, its bias, then a residual add of a runtime tensor: the
    padding runs through the bias, and the slice comes before the add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(64, 232, 3, padding=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.hardtanh(self.conv(x) + skip, -1.0, 1.0) * 2.0


def test_residual_conv_is_sliced_before_the_runtime_operand(tmp_path, caplog):
    torch.manual_seed(0)
    net = ConvResidual().eval()
    inputs = (torch.randn(1, 64, 9, 9), torch.randn(1, 232, 9, 9))
    names = _kernel_names(net, inputs, "x86-64-v4-vnni")
    assert any("strided_slice" in n for n in names), names
    _check(net, inputs, tmp_path, caplog, None, tol=1e-5, target="x86-64-v4-vnni")
    _check(net, inputs, tmp_path, caplog, None, tol=1e-5, target="llvm")


class Modulation(torch.nn.Module):
    """FocalNet's modulation input projection: a linear to ``2C + 3`` outputs over 7 x 7
    tokens (49 rows), split into a query, a context and three gates (session 27: 1539
    columns over 49 rows ran at 10 GFLOP/s, a predicated vector tail in every tile)."""

    def __init__(self, c: int = 96) -> None:
        super().__init__()
        self.c = c
        self.proj = torch.nn.Linear(c, 2 * c + 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, ctx, gates = torch.split(self.proj(x), (self.c, self.c, 3), -1)
        return q * torch.nn.functional.gelu(ctx) + gates.sum(-1, keepdim=True)


def test_linear_to_odd_columns_computes_whole_vectors_and_slices(tmp_path, caplog):
    """The linear's weight gets zero columns up to whole vectors at build time (195 -> 208),
    packed like any weight, the bias padded along; the slice fuses into a kernel after it and
    the block matches PyTorch."""
    torch.manual_seed(0)
    net = Modulation().eval()
    inputs = (torch.randn(1, 7, 7, 96),)
    names = _kernel_names(net, inputs, "x86-64-v4-vnni")
    matmul = [n for n in names if "matmul" in n]
    assert matmul and all("strided_slice" in n for n in matmul), names
    kernel = next(t for n, t in _scheduled(net, inputs).items() if "matmul" in n)
    assert "T.int64(208)" in kernel, kernel[:1500]
    _check(net, inputs, tmp_path, caplog, None, tol=1e-5, target="x86-64-v4-vnni")


class TiedHead(torch.nn.Module):
    """A tied embedding table of 1001 rows: the lookup and the output head read one matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(1001, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.table(ids)) @ self.table.weight.T


def test_tied_table_is_not_padded_into_a_second_copy(tmp_path, caplog):
    """Padding the head's columns would store the shared table twice (113 MB more for
    SmolLM2's vocabulary, the tied-embedding pass stores it once): the head is left alone."""
    torch.manual_seed(0)
    net = TiedHead().eval()
    inputs = (torch.randint(0, 1001, (1, 16)),)
    names = _kernel_names(net, inputs, "x86-64-v4-vnni")
    assert any("matmul" in n for n in names) and not any("strided_slice" in n for n in names), \
        names
    _check(net, inputs, tmp_path, caplog, None, tol=1e-5, target="x86-64-v4-vnni")


def test_linears_shared_by_two_functions_are_not_padded():
    """A generation artifact's prefill and decode functions read the same weights: padding the
    prefill's copy would store a second one (the decode step's GEMV keeps the original), so in
    a module of several functions linears are left alone; alone, the same linear is padded."""
    import numpy as np
    import tvm
    from slimc.backends.tvm.schedules.conv_output_padding import pad_conv_outputs
    from tvm import relax

    weight = relax.const(np.random.default_rng(0).standard_normal((64, 195)).astype("float32"))

    def function(bb: relax.BlockBuilder, name: str, rows: int) -> None:
        x = relax.Var("x", relax.TensorType((rows, 64), "float32"))
        with bb.function(name, [x]):
            with bb.dataflow():
                out = bb.emit_output(relax.op.matmul(x, weight))
            bb.emit_func_output(out)

    def sliced(names: tuple[str, ...]) -> bool:
        bb = relax.BlockBuilder()
        for name in names:
            function(bb, name, 16)
        target = tvm.target.Target({"kind": "llvm", "mcpu": "znver5"})
        with target:
            mod = pad_conv_outputs(bb.get())
        return "strided_slice" in mod.script()

    assert sliced(("main",))
    assert not sliced(("prefill", "decode"))
