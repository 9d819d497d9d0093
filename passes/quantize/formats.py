"""Weight formats: how a float matrix ``W[N, K]`` (N outputs, K inputs) is stored and rebuilt.

Each format knows its storage cost (bits per weight *including* scales and zero points, the
number the budget solver and the byte checks use) and how to quantize with round-to-nearest.
The packed tensors are exactly what the artifact stores (see
``slimc.dialect``): int8 codes + one fp32 scale per output row; int4 codes two
per byte + one fp32 scale and one uint8 zero point per (row, group of ``group_size`` inputs);
int3 / int2 (:mod:`slimc.lowbit`): codes bit-packed, each row padded to whole groups, one fp16
scale and one fp16 minimum per (row, group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slimc.dialect import dequantize_int4, dequantize_int8, unpack_int4
from slimc.lowbit import LOWBIT_KINDS, bits_of, lowbit_fake_quantize, lowbit_row_bits
from slimc.lowbit import grid as lowbit_grid

__all__ = ["Format", "Int4Params", "dequantize_int4", "dequantize_int8", "fake_quantize",
           "fake_quantize_rows", "int4_params", "int4_codes", "pack_int4", "parse_format",
           "quantize_int8", "unpack_int4"]


@dataclass(frozen=True)
class Format:
    """A storage format: ``kind`` in fp32/fp16/bf16/int8/int4/int3/int2, plus the grouping.

    int4 grids: asymmetric with an integer zero point (default: the grid contains 0.0
    exactly), ``symmetric``, or ``float_zero``: per group an fp16 scale and an fp16 minimum
    (``w = code * scale + minimum``, the grid ``[min, max]`` of the group), the Q4_1 layout of
    GGUF / llama.cpp. Weights that already sit on such a grid (a model dequantized from a Q4_1
    GGUF) are represented exactly with ``group_size=32``. fp16 rather than fp32 parameters:
    at 32 weights per group they are a third of the bytes a decode step streams otherwise
    (6 -> 5 bits per weight), and generation is bandwidth-bound.
    """

    kind: str
    group_size: int = 0
    symmetric: bool = False
    float_zero: bool = False

    def __str__(self) -> str:
        if self.kind == "int4":
            suffix = "-sym" if self.symmetric else "-fz" if self.float_zero else ""
            return f"int4-g{self.group_size}{suffix}"
        if self.kind in LOWBIT_KINDS:
            return f"{self.kind}-g{self.group_size}"
        return self.kind

    @property
    def lowbit(self) -> bool:
        """int3 / int2: bit-packed codes with an fp16 scale and minimum per group."""
        return self.kind in LOWBIT_KINDS

    def bits_per_weight(self, k: int) -> float:
        """Average stored bits per weight of a row of ``k`` inputs, overhead included."""
        if self.kind == "fp32":
            return 32.0
        if self.kind in ("fp16", "bf16"):
            return 16.0
        if self.kind == "int8":
            return 8.0 + 32.0 / k
        if self.kind in LOWBIT_KINDS:
            return lowbit_row_bits(k, bits_of(self.kind), self.group_size) / k
        groups = -(-k // self.group_size)
        # per group: fp16 scale + fp16 minimum (float_zero), else fp32 scale + uint8 zero
        return (4.0 * (k + k % 2) + groups * (32 if self.float_zero else 40)) / k

    def nbytes(self, n: int, k: int) -> float:
        return n * k * self.bits_per_weight(k) / 8.0


def parse_format(text: str) -> Format:
    """``int4-g128``, ``int4-g32-sym``, ``int4-g32-fz``, ``int3-g64``, ``int2-g32``, ``int8``,
    ``fp16``, ``bf16``, ``fp32``."""
    if text.startswith(LOWBIT_KINDS):
        kind, _, rest = text.partition("-")
        group = int(rest[1:]) if rest.startswith("g") and rest[1:].isdigit() else \
            (64 if not rest else -1)
        if group < 8 or group % 8 or kind not in LOWBIT_KINDS:
            raise ValueError(f"unknown weight format {text!r} ({kind} takes -gN, N a "
                             "multiple of 8: int3-g64, int2-g32)")
        return Format(kind, group)
    if text.startswith("int4"):
        parts = text.split("-")
        group = next((int(p[1:]) for p in parts[1:] if p.startswith("g")), 128)
        return Format("int4", group, "sym" in parts[1:], "fz" in parts[1:])
    if text in ("int8", "fp16", "bf16", "fp32"):
        return Format(text)
    raise ValueError(f"unknown weight format {text!r}")


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8: codes in [-127, 127] and fp32 scales."""
    scale = (weight.abs().amax(dim=1) / 127.0).clamp_min(1e-12).float()
    codes = torch.clamp(torch.round(weight / scale[:, None]), -127, 127).to(torch.int8)
    return codes, scale


#: fp16's largest finite value and smallest subnormal: the range a float_zero grid's scale and
#: minimum are clamped to (a constant group gets the smallest step, not a zero division).
FP16_MAX = 65504.0
FP16_TINY = 2.0 ** -24


@dataclass
class Int4Params:
    """Per-(row, group) grid of int4 codes: ``w = (code - zero) * scale`` with an integer zero
    point, or ``w = code * scale + zero`` where ``zero`` is the group's minimum (``float_zero``,
    told apart by its floating dtype; see :func:`slimc.dialect.int4_grid_values`)."""

    scale: Tensor  # float32 [N, G], or float16 (``float_zero``)
    zero: Tensor  # uint8 [N, G] (an integer grid point), or the float16 minimum (``float_zero``)
    group_size: int


def _grouped(weight: Tensor, group_size: int) -> Tensor:
    n, k = weight.shape
    groups = -(-k // group_size)
    padded = torch.zeros(n, groups * group_size, dtype=weight.dtype)
    padded[:, :k] = weight
    if k % group_size:  # pad the last group with its own values, not with zeros
        padded[:, k:] = weight[:, -1:].expand(n, groups * group_size - k)
    return padded.reshape(n, groups, group_size)


def int4_params(weight: Tensor, group_size: int, symmetric: bool,
                float_zero: bool = False) -> Int4Params:
    """Min/max grid per group: asymmetric uses all 16 codes over [min, max] (widened to
    contain 0.0 for an integer zero point); ``float_zero``: the searched grid of
    :func:`slimc.lowbit.grid` (fp16 scale and minimum)."""
    if float_zero:
        # The grid with the smallest squared rounding error per group (the int3/int2 search:
        # shrunk ranges, least-squares refits; :func:`slimc.lowbit.grid`, cached by content).
        # Its candidates include the plain [min, max] grid, so weights already on a Q4_1 grid
        # stay exact; off it (a g64/g128 grid over g32 Q4_1 weights) min/max wasted range.
        scale, minimum = lowbit_grid(weight, 4, group_size)
        return Int4Params(scale.clamp(FP16_TINY, FP16_MAX).half(), minimum.half(), group_size)
    grouped = _grouped(weight.float(), group_size)
    if symmetric:
        scale = (grouped.abs().amax(dim=2) / 7.0).clamp_min(1e-12)
        zero = torch.full_like(scale, 8.0)
    else:
        lo = grouped.amin(dim=2).clamp_max(0.0)
        hi = grouped.amax(dim=2).clamp_min(0.0)
        scale = ((hi - lo) / 15.0).clamp_min(1e-12)
        zero = torch.clamp(torch.round(-lo / scale), 0, 15)
    return Int4Params(scale.float(), zero.to(torch.uint8), group_size)


#: Elements rounded at once by :func:`int4_codes` (4M: ~16 MB per float temporary).
CODES_CHUNK = 1 << 22


def int4_codes(weight: Tensor, params: Int4Params) -> Tensor:
    """Round-to-nearest codes ``uint8[N, K]`` of ``weight`` on the grid ``params``, a block of
    rows at a time for a large weight (the same codes: the grid is per row). Why: the gathered
    scales and minimums and the quotient are each weight-sized; packing the 320M decoder's
    49152 x 1024 table held ~1 GB of them, its -O2 compile's peak (issue 18)."""
    n, k = weight.shape
    rows = max(1, CODES_CHUNK // max(k, 1))
    if n > rows and params.scale.shape[0] == n and params.zero.shape[0] == n:
        out = torch.empty(n, k, dtype=torch.uint8)
        for start in range(0, n, rows):
            end = start + rows
            out[start:end] = _int4_codes(weight[start:end], Int4Params(
                params.scale[start:end], params.zero[start:end], params.group_size))
        return out
    return _int4_codes(weight, params)


def _int4_codes(weight: Tensor, params: Int4Params) -> Tensor:
    k = weight.shape[1]
    index = torch.arange(k) // params.group_size
    scale = params.scale[:, index]
    zero = params.zero.float()[:, index]
    if params.zero.is_floating_point():  # the group minimum (float_zero)
        return torch.clamp(torch.round((weight - zero) / scale.float()), 0, 15).to(torch.uint8)
    return torch.clamp(torch.round(weight / scale) + zero, 0, 15).to(torch.uint8)


def pack_int4(codes: Tensor) -> Tensor:
    """Codes ``uint8[N, K]`` -> ``uint8[N, ceil(K/2)]``, the even column in the low nibble."""
    n, k = codes.shape
    if k % 2:
        codes = torch.cat([codes, torch.zeros(n, 1, dtype=codes.dtype)], dim=1)
    pairs = codes.reshape(n, -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def fake_quantize(weight: Tensor, fmt: Format) -> Tensor:
    """What ``weight`` becomes after a round trip through ``fmt`` (round-to-nearest)."""
    if fmt.kind == "fp32":
        return weight
    if fmt.kind in ("fp16", "bf16"):
        dtype = torch.float16 if fmt.kind == "fp16" else torch.bfloat16
        return weight.to(dtype).float()
    if fmt.kind == "int8":
        return dequantize_int8(*quantize_int8(weight))
    if fmt.kind in LOWBIT_KINDS:
        return lowbit_fake_quantize(weight, bits_of(fmt.kind), fmt.group_size)
    params = int4_params(weight, fmt.group_size, fmt.symmetric, fmt.float_zero)
    if weight.dtype == torch.float32 and weight.dim() == 2:
        return int4_round_trip(weight, params)
    codes = int4_codes(weight, params)
    return dequantize_int4(pack_int4(codes), params.scale, params.zero, fmt.group_size,
                           weight.shape[1])


def int4_round_trip(weight: Tensor, params: Int4Params) -> Tensor:
    """``dequantize_int4(pack_int4(int4_codes(weight, params)), ...)`` for a float32 ``[N, K]``
    weight, bit for bit (the same float operations in the same order on each element), on the
    ``[N, groups, group_size]`` view: no gathered per-element scale / zero tensors, no uint8
    codes, no packing and unpacking. Why: the budget search's damage table round-trips every
    weight through three to five int4 grids, and those copies were ~15% of the 320M decoder's
    -O2 search (issue 18)."""
    n, k = weight.shape
    group = params.group_size
    grouped = weight.reshape(n, k // group, group) if k % group == 0 else \
        _grouped(weight, group)
    scale = params.scale.float()[..., None]
    zero = params.zero.float()[..., None]
    if params.zero.is_floating_point():  # w = code * scale + minimum
        q = (grouped - zero).div_(scale).round_().clamp_(0, 15)
        out = q.mul_(scale).add_(zero)
    else:  # w = (code - zero) * scale
        q = (grouped / scale).round_().add_(zero).clamp_(0, 15)
        out = q.sub_(zero).mul_(scale)
    out = out.reshape(n, -1)
    return out[:, :k].contiguous() if out.shape[1] != k else out


#: Rows fake-quantized at once by :func:`fake_quantize_rows`.
FAKE_QUANTIZE_ROWS = 8192


def fake_quantize_rows(weight: Tensor, fmt: Format, rows: int = FAKE_QUANTIZE_ROWS) -> Tensor:
    """:func:`fake_quantize`, ``rows`` rows at a time into one output: the same values (every
    format's grid is per row, or per group within a row), for about one weight-sized
    temporary instead of five. Why: the budget search's damage table fake-quantizes SmolLM2's
    49152 x 576 tied table (113 MB) once per choice, and each int4 round trip held ~0.5 GB
    of full-size temporaries, the table's peak (issue 18). A searched (``-fz``) grid is still
    found for the whole weight, so it is cached under the same content key the quantize pass
    looks up later."""
    n = weight.shape[0]
    if fmt.kind == "fp32" or weight.dim() != 2 or n <= rows or fmt.kind in LOWBIT_KINDS:
        return fake_quantize(weight, fmt)
    out = torch.empty(weight.shape, dtype=torch.float32)
    if fmt.kind == "int4" and fmt.float_zero:
        params = int4_params(weight, fmt.group_size, fmt.symmetric, fmt.float_zero)
        k = weight.shape[1]
        for start in range(0, n, rows):
            part = Int4Params(params.scale[start:start + rows], params.zero[start:start + rows],
                              fmt.group_size)
            if weight.dtype == torch.float32:
                out[start:start + rows] = int4_round_trip(weight[start:start + rows], part)
                continue
            codes = int4_codes(weight[start:start + rows], part)
            out[start:start + rows] = dequantize_int4(pack_int4(codes), part.scale, part.zero,
                                                      fmt.group_size, k)
        return out
    for start in range(0, n, rows):
        out[start:start + rows] = fake_quantize(weight[start:start + rows], fmt)
    return out
