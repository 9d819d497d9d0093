"""Tiny ``module:factory`` models for tests/test_factory_models.py (``tests.factory_models:NAME``).

Each covers ops or dtypes a small ``torch.nn`` model uses that TVM 0.27's importer got wrong or
refused: GRU / Elman RNN, negative ``select`` indices, ``amax``/``amin``, float16 / bfloat16 /
float64 weights, index assignment, ``unfold``, ``heaviside``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Recurrent(nn.Module):
    """A GRU and a ReLU RNN (2 layers, bidirectional, batch-first) read at the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(6, 8, num_layers=2, batch_first=True, bidirectional=True)
        self.rnn = nn.RNN(6, 8, nonlinearity="relu")
        self.head = nn.Linear(16, 3)

    def forward(self, x, h0):
        out, h_n = self.gru(x, h0)
        seq, h_rnn = self.rnn(x.transpose(0, 1))
        logits = self.head(out[:, -1])  # select with a negative index
        return logits, h_n, seq[-2], h_rnn, torch.amax(out, dim=1), torch.amin(out, dim=(0, 2),
                                                                               keepdim=True)


def recurrent():
    torch.manual_seed(0)
    return Recurrent().eval(), (torch.randn(2, 4, 6), torch.randn(4, 2, 8))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5), nn.LayerNorm(5)).eval()


def cnn_float16():
    torch.manual_seed(0)
    return _cnn().half(), (torch.randn(1, 3, 8, 8).half(),)


def cnn_bfloat16():
    torch.manual_seed(0)
    return _cnn().bfloat16(), (torch.randn(1, 3, 8, 8).bfloat16(),)


def cnn_float64():
    torch.manual_seed(0)
    return _cnn().double(), (torch.randn(1, 3, 8, 8).double(),)


class _Bf16Output(nn.Module):
    def forward(self, x):
        return (x * 2).bfloat16()


def bfloat16_output():
    return _Bf16Output(), (torch.randn(2, 3),)


class _HalfInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        w, b = self.linear.weight.half(), self.linear.bias.half()
        return nn.functional.linear(x.half(), w, b).float()


def half_inside_forward():
    torch.manual_seed(0)
    return _HalfInside(), (torch.randn(2, 4),)


class Indexing(nn.Module):
    """Negative entries in index tensors (a buffer and an input), ``x.min(dim)``, a 0-d input,
    an adaptive max pool."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rows", torch.tensor([-1, 0, -3]))

    def forward(self, x, idx, scale):
        values, where = x.min(dim=1)
        pooled = nn.functional.adaptive_max_pool2d(x[None, None], (3, 2))  # 4x5: uneven
        return x[self.rows] * scale, x[:, idx], values, where, pooled


def indexing():
    torch.manual_seed(0)
    return Indexing().eval(), (torch.randn(4, 5), torch.tensor([-1, 2, -5]), torch.tensor(0.5))


class Reductions(nn.Module):
    """Ops TVM 0.27 refused or computed wrongly (found by compiling ~120 common ops one output
    each): ``prod``/``cumprod`` (no converter; torch's decomposition table has them), linear
    ``F.interpolate`` and integer ``clamp`` with one bound (an infinite integer bound broke the
    build), ``selu``/``elu`` with scale (TVM dropped the scale), ``var_mean``/``std_mean``,
    ``GroupNorm(affine=False)`` (the import crashed) and ``RReLU`` in eval mode (no converter)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.norm = nn.GroupNorm(3, 3, affine=False)
        self.rrelu = nn.RReLU()

    def forward(self, x):
        y = self.linear(x)
        var, mean = torch.var_mean(y, -1)
        std, _ = torch.std_mean(y, (1, 2), keepdim=True, correction=0)
        bucket = torch.clamp(y.argmax(-1), max=5) + y.argmin(-1).clamp_min(2)
        return (y.prod(-1), torch.cumprod(y, 1), nn.functional.interpolate(y, scale_factor=2,
                                                                            mode="linear"),
                bucket, nn.functional.selu(y), torch.ops.aten.elu(y, 0.7, 1.3, 0.5), var, mean,
                std, self.norm(y), self.rrelu(y))


def reductions():
    torch.manual_seed(0)
    return Reductions().eval(), (torch.randn(2, 3, 8),)


class _Cummax(nn.Module):
    def forward(self, x):
        return torch.cummax(x, -1).values


def cummax():
    """An op neither TVM nor torch's decomposition table can lower: refused by name."""
    return _Cummax(), (torch.randn(2, 8),)


class Scatters(nn.Module):
    """Ops whose TVM import or build failed with an internal error (exit 1 "please report"):
    ``x[idx] = v`` / ``x[:, idx] = v`` (``index_put`` with fewer index tensors than dims, or a
    ``None`` for a leading full slice), ``Tensor.unfold`` (torch keeps it core; its
    decomposition is an ``as_strided`` TVM lacks) and ``torch.heaviside`` (its decomposition
    builds an int64 ``scalar_tensor`` that TVM then compares with float32)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 6)

    def forward(self, x, idx, values):
        y = self.linear(x)
        rows = y.clone()
        rows[idx] = 1.5
        cols = y.clone()
        cols[:, idx] = y[:, :2] * 2
        accum = y.clone()
        accum.index_put_((idx,), y[:2], accumulate=True)
        return (rows, cols, accum, y.unfold(1, 3, 2) * 2, y.unfold(0, 2, 1).sum(-1),
                torch.heaviside(y.round(), values))


def scatters():
    torch.manual_seed(0)
    return Scatters().eval(), (torch.randn(4, 6), torch.tensor([1, 3]), torch.rand(6))


class MaskAssigns(nn.Module):
    """Boolean-mask assignment in the ways models write it: ``x[mask] = c`` with a full or a
    row mask, a 0-d tensor value, a row broadcast over the selected rows, one row per selected
    element, ``x[:, mask] = v``, an accumulating ``index_put_``, ``masked_fill_`` with a tensor
    value and ``masked_scatter``. TVM's ``index_put`` converter refused boolean indices and
    had no ``masked_scatter``; each is a ``where`` (see ``backends/tvm/mask_index.py``)."""

    def forward(self, x, mask, rows, cols, value, src):
        y = x * 2
        a = y.clone()
        a[mask] = 0.5
        b = y.clone()
        b[rows] = -1.0
        c = y.clone()
        c[mask] = value
        d = y.clone()
        d[rows] = y[0] * 3
        e = y.clone()
        e[rows] = src[:2]  # rows has two True entries: one row each
        f = y.clone()
        f[:, cols] = y[:, :1] + 1
        g = y.clone()
        g.index_put_((rows,), y[1], accumulate=True)
        h = y.clone()
        h.masked_fill_(mask, value)
        return a, b, c, d, e, f, g, h, y.masked_scatter(mask, src)


def mask_assigns():
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    return MaskAssigns().eval(), (x, x > 0.1, torch.tensor([False, True, False, True]),
                                  torch.tensor([True, False, True]), torch.tensor(2.5),
                                  torch.arange(12.0).reshape(4, 3))


class _MaskRead(nn.Module):
    def forward(self, x, mask):
        return x[mask].sum(0, keepdim=True)


def mask_read():
    """``x[bool_mask]`` read: its size depends on the mask's values; TVM's ``index.Tensor``
    converter rejects boolean indices with a TypeError that names no op; refused as a usage
    limitation naming the op."""
    return _MaskRead(), (torch.randn(4, 3), torch.tensor([True, False, True, False]))


class DynamicIndex(nn.Module):
    """Index tensors with negative entries on axes that are dynamic when exported so."""

    def forward(self, x, idx):
        return x[:, idx] * 2, x[:, :, idx.abs() - 3] + 1, x[idx, 1:]


class IntDivision(nn.Module):
    """``torch.div(..., rounding_mode=...)`` on int64/int32 tensors by Python ints and tensors
    (negative operands included) and on floats: TVM's converter made the int divisor an int32
    or float32 constant (refused "Binary operators must have the same datatype")."""

    def forward(self, x, ids):
        scaled = (x * 10).long()
        return (torch.div(ids, 3, rounding_mode="floor"), ids // 4,
                torch.div(ids, -3, rounding_mode="trunc"),
                torch.div(scaled, ids.abs() + 1, rounding_mode="floor"),
                torch.div(scaled, ids * 2 + 1, rounding_mode="trunc"),
                torch.div(ids.int(), 3, rounding_mode="floor"),
                torch.div(x, -0.3, rounding_mode="trunc"), torch.div(x, 0.3, rounding_mode="floor"))


def int_division():
    torch.manual_seed(0)
    return IntDivision(), (torch.randn(3, 4), torch.randint(-20, 20, (3, 4)))


class PairIndexing(nn.Module):
    """Several index tensors among full slices: ``x[:, a, b]`` (TVM took them one after the
    other: ``(1, 3, 3)`` for ``(1, 3)``), separated by a slice, a grid, and trilinear
    upsampling, whose decomposition indexes ``x[:, :, d, h, w]`` (TVM: ``(4, 4, 12)`` for
    ``(1, 1, 4, 4, 12)``)."""

    def forward(self, x, a, b):
        y = x * 2
        return (y[:, a, b], y.reshape(4, 2, 3)[a[:2], :, b[:2] % 3],
                y[:, a[:, None], b], F.interpolate(y.reshape(1, 1, 2, 2, 6), scale_factor=2,
                                                   mode="trilinear"))


def pair_indexing():
    torch.manual_seed(0)
    return PairIndexing(), (torch.randn(1, 4, 6), torch.tensor([0, 3, 1]),
                            torch.tensor([1, 5, 2]))


class _BoolCount(nn.Module):
    def forward(self, x):
        return torch.count_nonzero(x > 0, 1)


def bool_count():
    """``count_nonzero`` of a boolean tensor imports as ``not_equal(bool, False)``, which
    TVM's LLVM code generation rejects (``fcmp`` on ``i1``) when it is built: a build
    failure of one op, refused by name (exit 2) instead of "could not build ... report"."""
    return _BoolCount(), (torch.randn(4, 6),)
