"""Weight formats: how a float matrix ``W[N, K]`` (N outputs, K inputs) is stored and rebuilt.

Each format knows its storage cost (bits per weight *including* scales and zero points, the
number the budget solver and the byte checks use) and how to quantize with round-to-nearest.
The packed tensors are exactly what the artifact stores (see
``slimc.dialect``): int8 codes + one fp32 scale per output row; int4 codes two
per byte + one fp32 scale and one uint8 zero point per (row, group of ``group_size`` inputs);
int3 / int2 (:mod:`slimc.lowbit`): codes bit-packed, each row padded to whole groups, one fp16
scale and one fp16 minimum per (row, group). ``-qs`` (quantized scales, :mod:`slimc.coded_scales`):
the same codes, each group's step and minimum stored as 8-bit codes against two fp16 units per
row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slimc.coded_scales import CODE_WIDTHS, CodedGrid, code_grid
from slimc.dialect import dequantize_int4, dequantize_int8, unpack_int4
from slimc.lowbit import (
    LOWBIT_KINDS,
    bits_of,
    codes_on_grid,
    lowbit_fake_quantize,
    lowbit_row_bits,
    padded_k,
)
from slimc.lowbit import grid as lowbit_grid

__all__ = ["CodedGrid", "Format", "Int4Params", "coded_codes", "coded_grid", "coded_values",
           "dequantize_int4", "dequantize_int8", "fake_quantize", "fake_quantize_rows",
           "int4_codes", "int4_params", "pack_int4", "parse_format", "quantize_int8",
           "unpack_int4"]


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

    ``coded_scales`` (spelled ``-qs``: ``int4-g32-qs``, ``int3-g64-qs``): a float-zero grid
    (int4, int3, int2) whose per-group step and minimum are stored as 8-bit codes against one
    fp16 unit each per row (:mod:`slimc.coded_scales`): 16 instead of 32 bits per group.
    ``scale_bits`` narrower than 8 (spelled ``-qs5``, ``-qs6``: 4..7) stores them as bit-packed
    codes of that width: 10 bits per group at ``-qs5``.
    """

    kind: str
    group_size: int = 0
    symmetric: bool = False
    float_zero: bool = False
    coded_scales: bool = False
    scale_bits: int = 8

    def __str__(self) -> str:
        qs = ("-qs" if self.scale_bits == 8 else f"-qs{self.scale_bits}") \
            if self.coded_scales else ""
        if self.kind == "int4":
            suffix = "-sym" if self.symmetric else qs or ("-fz" if self.float_zero else "")
            return f"int4-g{self.group_size}{suffix}"
        if self.kind in LOWBIT_KINDS:
            return f"{self.kind}-g{self.group_size}{qs}"
        return self.kind

    @property
    def code_bits(self) -> int:
        """Bits of one weight code (int4/int3/int2)."""
        return 4 if self.kind == "int4" else bits_of(self.kind)

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
        if self.coded_scales:  # codes, two scale_bits codes per group, two fp16 units per row
            codes = 4 * (k + k % 2) if self.kind == "int4" else \
                padded_k(k, self.group_size) * self.code_bits
            return (codes + 2.0 * self.scale_bits * -(-k // self.group_size) + 32.0) / k
        if self.kind in LOWBIT_KINDS:
            return lowbit_row_bits(k, bits_of(self.kind), self.group_size) / k
        groups = -(-k // self.group_size)
        # per group: fp16 scale + fp16 minimum (float_zero), else fp32 scale + uint8 zero
        return (4.0 * (k + k % 2) + groups * (32 if self.float_zero else 40)) / k

    def nbytes(self, n: int, k: int) -> float:
        return n * k * self.bits_per_weight(k) / 8.0


#: The weight formats, as :func:`parse_format` reads them (for messages and ``--help``).
FORMAT_SPELLINGS = ("int4-g128", "int4-g32-sym", "int4-g32-fz", "int4-g32-qs", "int3-g64",
                    "int3-g64-qs", "int3-g32-qs5", "int2-g32", "int8", "fp16", "bf16", "fp32")


def parse_format(text: str) -> Format:
    """A weight format from its name: ``int4-gN`` (N even; default 128) with ``-sym``
    (symmetric), ``-fz`` (fp16 scale and minimum per group, GGUF Q4_1) or ``-qs`` (the ``-fz``
    grid with 8-bit step and minimum codes against fp16 row units, :mod:`slimc.coded_scales`;
    ``-qsB``, B in 4..7: B-bit codes); ``int3-gN`` / ``int2-gN`` (N a multiple of 8; default
    64), optionally ``-qs`` / ``-qsB``; ``int8``, ``fp16``, ``bf16``, ``fp32``. E.g.
    ``int4-g128``, ``int4-g32-fz``, ``int4-g64-qs``, ``int3-g64``, ``int3-g32-qs5``,
    ``int2-g32``."""
    kind, *options = text.split("-")
    if kind in ("int8", "fp16", "bf16", "fp32") and not options:
        return Format(text)
    if kind not in ("int4", *LOWBIT_KINDS):
        raise ValueError(f"unknown weight format {text!r} (formats: "
                         f"{', '.join(FORMAT_SPELLINGS)})")
    allowed = ("sym", "fz", "qs") if kind == "int4" else ("qs",)
    groups = [o for o in options if o.startswith("g")]
    flags = [o for o in options if not o.startswith("g")]
    widths = [o for o in flags if o.startswith("qs") and o != "qs"]
    if widths:
        width = widths[0][2:]
        twice = len(widths) > 1 or "qs" in flags
        if twice or not width.isdigit() or int(width) not in CODE_WIDTHS[:-1]:
            what = "-qs given twice" if twice else f"-qs{width} is not a code width"
            raise ValueError(
                f"unknown weight format {text!r} ({what}: -qs stores "
                f"each group's step and minimum as 8-bit codes, -qsB as B-bit codes with B "
                f"in {', '.join(map(str, CODE_WIDTHS[:-1]))}, e.g. {kind}-g32-qs5; 8-bit codes "
                f"are spelled -qs)")
        flags = ["qs" if o == widths[0] else o for o in flags]
    scale_bits = int(widths[0][2:]) if widths else 8
    bad = [o for o in groups if not o[1:].isdigit()] + [o for o in flags if o not in allowed]
    if "sym" in flags and len(flags) > 1:
        bad.append("-sym together with -" + "/-".join(f for f in flags if f != "sym"))
    if bad or len(groups) > 1 or len(set(flags)) != len(flags):
        usage = ("-gN with N even, then -sym, -fz or -qs: int4-g128, int4-g32-qs"
                 if kind == "int4" else
                 f"-gN with N a multiple of 8, then optionally -qs: {kind}-g64, {kind}-g32-qs")
        raise ValueError(f"unknown weight format {text!r} ("
                         + (f"{', '.join(map(repr, bad))}: not an option of {kind}; "
                            if bad else "") + f"{kind} takes {usage})")
    group = int(groups[0][1:]) if groups else (128 if kind == "int4" else 64)
    qs = "qs" in flags
    if kind == "int4":
        if group < 2 or group % 2:
            raise ValueError(f"unknown weight format {text!r} (int4 groups are even: "
                             "int4-g32, int4-g128)")
        return Format("int4", group, "sym" in flags, "fz" in flags or qs, qs, scale_bits)
    if group < 8 or group % 8:
        raise ValueError(f"unknown weight format {text!r} ({kind} takes -gN, N a "
                         f"multiple of 8: {kind}-g64, {kind}-g32-qs)")
    return Format(kind, group, coded_scales=qs, scale_bits=scale_bits)


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


def coded_grid(weight: Tensor, fmt: Format) -> CodedGrid:
    """The ``-qs`` grid of ``weight [N, K]``: the format's float-zero grid (the searched grid
    of :func:`slimc.lowbit.grid`; weights already on a min/max grid keep it), its steps and
    minimums rounded to nearest on 8-bit codes (:func:`slimc.coded_scales.code_grid`)."""
    step, minimum = lowbit_grid(weight, fmt.code_bits, fmt.group_size)
    return code_grid(step, minimum, fmt.scale_bits)


def coded_codes(weight: Tensor, fmt: Format, coded: CodedGrid) -> Tensor:
    """Round-to-nearest codes of ``weight`` on the decoded ``-qs`` grid (so every weight is
    exactly representable): ``uint8[N, K]`` (int4) or ``[N, K']`` padded to whole groups."""
    step, minimum = coded.decoded()
    if fmt.kind == "int4":
        return int4_codes(weight, Int4Params(step, minimum, fmt.group_size))
    return codes_on_grid(weight, step.float(), minimum.float(), fmt.code_bits, fmt.group_size)


def coded_values(codes: Tensor, fmt: Format, coded: CodedGrid, k: int) -> Tensor:
    """Float weight ``[N, k]`` of ``codes`` on a ``-qs`` grid (the reference dequantization)."""
    step, minimum = coded.decoded()
    if fmt.kind == "int4":
        return dequantize_int4(pack_int4(codes), step, minimum, fmt.group_size, k)
    index = torch.arange(k) // fmt.group_size
    return codes[:, :k].float() * step.float()[:, index] + minimum.float()[:, index]


def fake_quantize(weight: Tensor, fmt: Format) -> Tensor:
    """What ``weight`` becomes after a round trip through ``fmt`` (round-to-nearest)."""
    if fmt.kind == "fp32":
        return weight
    if fmt.coded_scales:
        coded = coded_grid(weight, fmt)
        return coded_values(coded_codes(weight, fmt, coded), fmt, coded,
                            weight.shape[1]).to(weight.dtype)
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
    if fmt.kind == "fp32" or weight.dim() != 2 or n <= rows or fmt.kind in LOWBIT_KINDS \
            or fmt.coded_scales:
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
