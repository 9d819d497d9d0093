"""The dialect's convolution and mixture-of-experts ops (see :mod:`slimc.dialect`).

Weight-only quantized convolutions: the weight is stored as its matrix ``[O, R]``, ``R =
I/groups * prod(kernel)`` (each output channel's reduction axis flattened in ``(channel,
*kernel)`` order), per output channel int8 codes, or int4 codes with one scale and zero point
per group of ``group_size`` along ``R`` (the linear packing, reused). That covers regular,
depthwise (``I/groups = 1``), pointwise (1x1) and grouped convolutions, 1-D and 2-D.

* ``conv_int8(x, qweight int8[O,R], scale f32[O], bias?, kernel, stride, padding, dilation,
  groups)``
* ``conv_int4(x, packed uint8[O,ceil(R/2)], scale f32[O,G], zero uint8[O,G], bias?, kernel,
  stride, padding, dilation, groups, group_size)``

* ``conv_w8a8(x, qweight int8[O,R], in_mult f32[C], out_scale f32[O], bias?, kernel, stride,
  padding, dilation, groups, zero_point)``: int8 weights *and* activations (static, calibrated),
  the convolution form of ``linear_w8a8``: ``a = clamp(round(x * in_mult[c]) + zero_point,
  -128, 127)`` per input channel ``c``, the convolution runs on the integers ``a - zero_point``
  (padding contributes exactly 0), ``y = acc * out_scale[o] + bias[o]``.

``padding`` is explicit, ``[before, after]`` per spatial axis (``padding='same'`` of an even
kernel is asymmetric).

Mixture-of-experts tensors: transformers 5 stores a layer's experts as one 3-D parameter
``W[E, N, K]`` and gathers ``W[expert_ids]`` per routed token before a batched matmul; the
quantized gather reads packed codes and dequantizes the gathered slices, per expert and output
row (int8) or per (expert, row, group of inputs) (int4). The batched matmul is unchanged.

* ``expert_gather_int8(qweight int8[E,N,K], scale f32[E,N], ids, transposed)``
* ``expert_gather_int4(packed uint8[E,N,ceil(K/2)], scale f32[E,N,G], zero uint8[E,N,G], ids,
  group_size, transposed)``

``transposed``: the model stores ``W[E, K, N]``; codes stay ``[E, N, K]`` and the gather
returns ``[S, K, N]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slimc.dialect import (
    OPS,
    dequantize_int4,
    dequantize_int8,
    int4_grid_values,
    quantize_activation,
    unpack_int4,
)


def _conv(x: Tensor, matrix: Tensor, bias: Tensor | None, kernel: list[int],
          stride: list[int], padding: list[int], dilation: list[int], groups: int) -> Tensor:
    weight = matrix.reshape(matrix.shape[0], -1, *kernel)
    pads: list[int] = []
    for before, after in reversed(list(zip(padding[0::2], padding[1::2], strict=True))):
        pads += [before, after]  # F.pad wants the last axis first
    if any(pads):
        x = F.pad(x, pads)
    conv = F.conv1d if len(kernel) == 1 else F.conv2d
    return conv(x, weight, bias, stride, 0, dilation, groups)


def conv_output_shape(x_shape: tuple[int, ...] | torch.Size, out_channels: int,
                      kernel: list[int], stride: list[int], padding: list[int],
                      dilation: list[int]) -> tuple[int, ...]:
    spatial = []
    for i, k in enumerate(kernel):
        size = x_shape[2 + i] + padding[2 * i] + padding[2 * i + 1]
        spatial.append((size - dilation[i] * (k - 1) - 1) // stride[i] + 1)
    return (x_shape[0], out_channels, *spatial)


@torch.library.custom_op("slimc::conv_int8", mutates_args=())
def conv_int8(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None,
              kernel: list[int], stride: list[int], padding: list[int], dilation: list[int],
              groups: int) -> Tensor:
    return _conv(x, dequantize_int8(qweight, scale), bias, kernel, stride, padding, dilation,
                 groups)


@torch.library.custom_op("slimc::conv_int4", mutates_args=())
def conv_int4(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None,
              kernel: list[int], stride: list[int], padding: list[int], dilation: list[int],
              groups: int, group_size: int) -> Tensor:
    reduction = x.shape[1] // groups
    for k in kernel:
        reduction *= k
    matrix = dequantize_int4(packed, scale, zero, group_size, reduction)
    return _conv(x, matrix, bias, kernel, stride, padding, dilation, groups)


@conv_int8.register_fake
def _(x, qweight, scale, bias, kernel, stride, padding, dilation, groups):
    return x.new_empty(conv_output_shape(x.shape, qweight.shape[0], kernel, stride, padding,
                                         dilation))


@conv_int4.register_fake
def _(x, packed, scale, zero, bias, kernel, stride, padding, dilation, groups, group_size):
    return x.new_empty(conv_output_shape(x.shape, packed.shape[0], kernel, stride, padding,
                                         dilation))


@torch.library.custom_op("slimc::conv_w8a8", mutates_args=())
def conv_w8a8(x: Tensor, qweight: Tensor, in_mult: Tensor, out_scale: Tensor,
              bias: Tensor | None, kernel: list[int], stride: list[int], padding: list[int],
              dilation: list[int], groups: int, zero_point: int) -> Tensor:
    # As ``linear_w8a8``: an integer-valued float32 convolution, exact while partial sums stay
    # below 2**24 (within float rounding of the artifact's int32 accumulation beyond that).
    per_channel = in_mult.reshape(1, -1, *([1] * len(kernel)))
    codes = quantize_activation(x, per_channel, zero_point) - zero_point
    shape = (1, -1, *([1] * len(kernel)))
    y = _conv(codes, qweight.float(), None, kernel, stride, padding, dilation, groups)
    y = y * out_scale.reshape(shape)
    return y + bias.reshape(shape) if bias is not None else y


@conv_w8a8.register_fake
def _(x, qweight, in_mult, out_scale, bias, kernel, stride, padding, dilation, groups,
      zero_point):
    return x.new_empty(conv_output_shape(x.shape, qweight.shape[0], kernel, stride, padding,
                                         dilation))


OPS.update({
    "conv_int8": torch.ops.slimc.conv_int8.default,
    "conv_int4": torch.ops.slimc.conv_int4.default,
    "conv_w8a8": torch.ops.slimc.conv_w8a8.default,
})

def _dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int,
                     k: int) -> Tensor:
    codes = unpack_int4(packed.reshape(-1, packed.shape[-1]), k).float()
    codes = codes.reshape(*packed.shape[:-1], k)
    return int4_grid_values(codes, scale, zero, torch.arange(k) // group_size)


def _orient(values: Tensor, transposed: bool) -> Tensor:
    return values.transpose(-1, -2).contiguous() if transposed else values


@torch.library.custom_op("slimc::expert_gather_int8", mutates_args=())
def expert_gather_int8(qweight: Tensor, scale: Tensor, ids: Tensor, transposed: bool) -> Tensor:
    return _orient(qweight[ids].float() * scale[ids][..., None], transposed)


def expert_k(packed_width: int, groups: int, group_size: int) -> int:
    """Inputs per row of a packed int4 expert tensor (the last group may be partial; odd widths
    are stored as int8 by ``quantize``)."""
    return min(2 * packed_width, groups * group_size)


@torch.library.custom_op("slimc::expert_gather_int4", mutates_args=())
def expert_gather_int4(packed: Tensor, scale: Tensor, zero: Tensor, ids: Tensor,
                       group_size: int, transposed: bool) -> Tensor:
    k = expert_k(packed.shape[-1], scale.shape[-1], group_size)
    rows = _dequantize_int4(packed[ids], scale[ids], zero[ids], group_size, k)
    return _orient(rows, transposed)


def _fake(ids: Tensor, n: int, k: int, transposed: bool, like: Tensor) -> Tensor:
    # float32 whatever the scales' dtype: the codes are dequantized in float32, and float16
    # scales (the ``-fz`` formats) promote to it, as in the real kernels above
    return like.new_empty((*ids.shape, *((k, n) if transposed else (n, k))),
                          dtype=torch.float32)


@expert_gather_int8.register_fake
def _(qweight, scale, ids, transposed):
    return _fake(ids, qweight.shape[1], qweight.shape[2], transposed, scale)


@expert_gather_int4.register_fake
def _(packed, scale, zero, ids, group_size, transposed):
    k = expert_k(packed.shape[-1], scale.shape[-1], group_size)
    return _fake(ids, packed.shape[1], k, transposed, scale)


OPS.update({
    "expert_gather_int8": torch.ops.slimc.expert_gather_int8.default,
    "expert_gather_int4": torch.ops.slimc.expert_gather_int4.default,
})
