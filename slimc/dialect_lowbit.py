"""The dialect's int3 / int2 ops (see :mod:`slimc.dialect`; layout in :mod:`slimc.lowbit`).

* ``linear_lowbit(x, packed uint8[N, K'*B/8], scale f16[N,G], minimum f16[N,G], bias?,
  act_scale?, bits, group_size)``: ``K'`` = ``K`` rounded up to whole groups; code ``k`` of
  row ``n`` is bits ``[k*B, k*B+B)`` of the row's little-endian bit stream and stands for
  ``code * scale[n, k//G] + minimum[n, k//G]``.
* ``embedding_lowbit(packed, scale, minimum, ids, bits, group_size, dim)``: gather rows, then
  dequantize their first ``dim`` values (a tied output head reads the same table through
  ``linear_lowbit``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimc.dialect import OPS, _fake_linear, _linear
from slimc.lowbit import dequantize_lowbit


@torch.library.custom_op("slimc::linear_lowbit", mutates_args=())
def linear_lowbit(x: Tensor, packed: Tensor, scale: Tensor, minimum: Tensor,
                  bias: Tensor | None, act_scale: Tensor | None, bits: int,
                  group_size: int) -> Tensor:
    weight = dequantize_lowbit(packed, scale, minimum, bits, group_size, x.shape[-1])
    return _linear(x, weight, bias, act_scale)


@torch.library.custom_op("slimc::embedding_lowbit", mutates_args=())
def embedding_lowbit(packed: Tensor, scale: Tensor, minimum: Tensor, ids: Tensor, bits: int,
                     group_size: int, dim: int) -> Tensor:
    flat = ids.reshape(-1)
    rows = dequantize_lowbit(packed[flat], scale[flat], minimum[flat], bits, group_size, dim)
    return rows.reshape(*ids.shape, dim)


@linear_lowbit.register_fake
def _(x, packed, scale, minimum, bias, act_scale, bits, group_size):
    return _fake_linear(x, packed.shape[0])


@embedding_lowbit.register_fake
def _(packed, scale, minimum, ids, bits, group_size, dim):
    return ids.new_empty((*ids.shape, dim), dtype=torch.float32)


OPS.update({
    "linear_lowbit": torch.ops.slimc.linear_lowbit.default,
    "embedding_lowbit": torch.ops.slimc.embedding_lowbit.default,
})
