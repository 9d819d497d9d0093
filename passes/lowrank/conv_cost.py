"""Is a factorized layer faster than the dense one *on the target*? Convolutions (Tucker-2, or
for 1x1 two factors) and linears (two GEMMs) are priced by the same roofline.

Counting multiply-adds is not enough: slimc's CPU backend runs 3x3 stride-1 convolutions on
large feature maps as Winograd ``F(4x4, 3x3)`` (:class:`slimc.backend.WinogradRule`, from the
``target-info`` analysis), i.e. with 4x fewer multiplies than their MAC count, while the two
pointwise convs of the factorized form run at full cost. A 128-channel 3x3 conv on 56x56 at
channel ranks (96, 96) does 27% fewer MACs but 23% *more* multiplies, and measured 1.23x
slower. Each conv (dense, and each factor) is priced by the cost analysis's roofline,

    max(2·multiplies / peak FLOP/s, bytes moved / bandwidth) + per-op overhead,

with the multiplies the target really does and the hardware numbers of the target's entry.
Without hardware numbers the multiplies alone decide. A linear ``W[N, K]`` at rank ``r`` runs
two GEMMs (``K -> r -> N``) instead of one: fewer multiplies and weight bytes, but an extra
operator and an extra activation round trip, which decide for small layers and short inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from slimc.backend import TargetInfo
from slimc.ir import hinted_shape
from slimc.layers import Layer, conv_geometry


@dataclass(frozen=True)
class ConvCall:
    """One convolution as the target runs it."""

    batch: int
    in_pixels: int
    out_size: tuple[int, ...]
    channels_in: int
    channels_out: int
    kernel: tuple[int, ...]
    winograd_eligible: bool  # 3x3, stride 1, dilation 1, 2-D

    @property
    def out_pixels(self) -> int:
        return math.prod(self.out_size)

    def multiplies(self, info: TargetInfo | None) -> int:
        if self.winograd_eligible and info is not None and info.winograd is not None:
            return info.winograd.multiplies(self.batch, *self.out_size, self.channels_in,
                                            self.channels_out)
        return (self.batch * self.out_pixels * self.channels_in * self.channels_out
                * math.prod(self.kernel))

    def bytes_moved(self) -> int:
        weights = self.channels_in * self.channels_out * math.prod(self.kernel)
        return 4 * (self.batch * (self.in_pixels * self.channels_in
                                  + self.out_pixels * self.channels_out) + weights)

    def seconds(self, info: TargetInfo | None) -> float:
        """Roofline latency on the target; the multiplies alone (as seconds at 1 FLOP/s)
        when the target has no hardware numbers."""
        priced = roofline_seconds(info, self.multiplies(info), self.bytes_moved())
        return 2.0 * self.multiplies(info) if priced is None else priced


def roofline_seconds(info: TargetInfo | None, multiplies: float, bytes_moved: float,
                     ops: int = 1) -> float | None:
    """``max(2·multiplies / peak, bytes / bandwidth) + ops x overhead`` with the numbers of the
    target's hardware entry; None when the target has none (no roofline to ask)."""
    peak = (info.peak_gflops.get("float32") if info is not None else None) or 0.0
    if not peak or info is None or not info.mem_bandwidth_gbs:
        return None
    return max(2.0 * multiplies / (peak * 1e9), bytes_moved / (info.mem_bandwidth_gbs * 1e9)) \
        + ops * (info.op_overhead_us or 0.0) * 1e-6


def linear_seconds(info: TargetInfo | None, n: int, k: int, tokens: int,
                   r: int | None = None) -> float | None:
    """Predicted time of a linear ``[tokens, K] -> [tokens, N]``: one GEMM (``r`` None) or
    the two GEMMs of its rank-``r`` factors (None: the target has no hardware numbers)."""
    if r is None:
        return roofline_seconds(info, tokens * n * k, 4 * (n * k + tokens * (n + k)))
    return roofline_seconds(info, tokens * r * (n + k),
                            4 * (r * (n + k) + tokens * (n + k + 2 * r)), ops=2)


def calls(layer: Layer, r_out: int | None = None, r_in: int | None = None) -> list[ConvCall]:
    """The convs every use of ``layer`` runs: dense (no ranks), or factorized at ``(r_out,
    r_in)`` channel ranks (pointwise in, spatial core, pointwise out; a 1x1 conv: the strided
    first factor and the pointwise second). Empty when a use has no static shapes."""
    o, i = int(layer.shape[0]), int(layer.shape[1])
    kernel = tuple(int(k) for k in layer.shape[2:])
    ones = (1,) * len(kernel)
    out = []
    for use in layer.uses:
        node = use.node
        x, y = node.args[0].meta.get("val"), node.meta.get("val")
        geometry = conv_geometry(node, tuple(layer.shape))
        if not isinstance(x, Tensor) or not isinstance(y, Tensor) or geometry is None:
            return []
        x_shape, y_shape = hinted_shape(x), hinted_shape(y)
        batch = x_shape[0]
        in_size, out_size = x_shape[2:], y_shape[2:]
        winograd = kernel == (3, 3) and set(geometry.stride) == {1} \
            and set(geometry.dilation) == {1}
        pix_in, pix_out = math.prod(in_size), math.prod(out_size)
        if r_out is None:
            out.append(ConvCall(batch, pix_in, out_size, i, o, kernel, winograd))
        elif math.prod(kernel) == 1:
            out += [ConvCall(batch, pix_in, out_size, i, r_out, kernel, False),
                    ConvCall(batch, pix_out, out_size, r_out, o, ones, False)]
        else:
            out += [ConvCall(batch, pix_in, in_size, i, r_in, ones, False),
                    ConvCall(batch, pix_in, out_size, r_in, r_out, kernel, winograd),
                    ConvCall(batch, pix_out, out_size, r_out, o, ones, False)]
    return out


def seconds(layer: Layer, info: TargetInfo | None, r_out: int | None = None,
            r_in: int | None = None) -> float | None:
    """Predicted time of ``layer``'s convs, dense or factorized (None: shapes unknown)."""
    found = calls(layer, r_out, r_in)
    return sum(c.seconds(info) for c in found) if found else None
