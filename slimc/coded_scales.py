"""Quantized group scales (``-qs`` formats, "K-quant" style; issue 17): the grid, its storage
and the dialect op that rebuilds it.

Why: a float-zero grid (``int4-g32-fz``, ``int3-g64``) stores an fp16 step and an fp16 minimum
per group, 32 bits per group: a fifth of ``int4-g32-fz``'s 5.0 bits per weight. Stored as
8-bit codes against one fp16 unit per row (what llama.cpp's Q4_K does with 6-bit codes in
super-blocks), they cost 16 bits per group plus 32 per row: 4.5 + 32/K bits per weight at
int4-g32, for ~0.9% relative weight error on SmolLM2's Q4_1 linears (docs/benchmarks.md,
wt/smol22).

Layout of a weight ``W[N, K]`` with ``G`` groups per row (the codes exactly as the format
without ``-qs``: int4 nibbles, or int3/int2 bit streams):

* ``scale_code uint8[N, G]`` (1..255) and ``scale_unit fp16[N]``: the group's step is
  ``fp16(scale_code * scale_unit)``;
* ``min_code int8[N, G]`` (-127..127) and ``min_unit fp16[N]``: the group's minimum is
  ``fp16(min_code * min_unit)``.

The products are exact in fp32 (8-bit times 11-bit significands) and rounded once to fp16, so
PyTorch and every kernel rebuild the same fp16 grid the existing float-zero kernels read.

Narrower codes (``-qs5``, ``-qs6``: ``bits`` of 4..7; what the SmolLM2 harness's 5-bit "K5x8"
recipe needs, docs/benchmarks.md wt/smol23): step codes 1..2^bits-1 and minimum codes
``-(2^(bits-1)-1)..2^(bits-1)-1``, each stream bit-packed row-major over all ``N x G`` codes
into one ``uint8`` vector (:func:`slimc.lowbit.pack_bits`, minimum codes stored with their
bias ``2^(bits-1)-1`` added so they are unsigned): ``ceil(N * G * bits / 8)`` bytes, what
``Format.bits_per_weight`` counts up to the last partial byte. Not per row: SmolLM2's 18 groups
per row would pad to 24 codes, 0.1 bit per weight. The rebuild op unpacks them
(``coded_scale(code, unit, like, bits, groups, signed)``); the int4 kernel that reads 8-bit
codes in its tiles does not take packed ones.

The op ``slimc::coded_scale(code, unit, like)`` does that rebuild in the IR. ``like`` is the
tensor its consumer reads at run time (the linear's input, the gather's ids); its values are
never read. Why it is there: every other operand is a constant, and TVM's ``FoldConstant``
evaluates any call whose operands are all constants, which would store the rebuilt fp16
grid in the artifact (32 bits per group again). With a run-time operand the rebuild stays a
small kernel (``N x G`` elements, 1/g of the weights) before the one that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Largest step code (unsigned) and largest |minimum code| (signed), 8-bit codes.
STEP_LEVELS = 255
MIN_LEVELS = 127
#: Code widths a ``-qsB`` format may name (8: plain ``-qs``).
CODE_WIDTHS = (4, 5, 6, 7, 8)


def levels(bits: int) -> tuple[int, int]:
    """``(largest step code, largest |minimum code|)`` of ``bits``-bit codes."""
    return (1 << bits) - 1, (1 << (bits - 1)) - 1
#: fp16's smallest normal value: the smallest row unit (a row of zeros still decodes).
UNIT_FLOOR = 2.0 ** -14


@dataclass
class CodedGrid:
    """A ``-qs`` grid: codes of each group's step and minimum, fp16 units per row. The codes
    are held unpacked (``uint8`` / ``int8 [N, G]``) whatever ``bits``; :meth:`tensors` packs
    narrower ones as stored."""

    scale_code: Tensor  # uint8 [N, G]
    min_code: Tensor  # int8 [N, G]
    scale_unit: Tensor  # float16 [N]
    min_unit: Tensor  # float16 [N]
    bits: int = 8

    def decoded(self) -> tuple[Tensor, Tensor]:
        """The fp16 ``(step, minimum)`` per (row, group) the kernels read."""
        return decode(self.scale_code, self.scale_unit), decode(self.min_code, self.min_unit)

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors: 8-bit codes as ``[N, G]``, narrower ones bit-packed
        (:func:`pack_codes`)."""
        scale_code, min_code = self.scale_code, self.min_code
        if self.bits < 8:
            scale_code = pack_codes(scale_code, self.bits)
            min_code = pack_codes(min_code, self.bits, signed=True)
        return {"scale_code": scale_code, "min_code": min_code,
                "scale_unit": self.scale_unit, "min_unit": self.min_unit}


def pack_codes(code: Tensor, bits: int, signed: bool = False) -> Tensor:
    """Codes ``[N, G]`` -> ``uint8[ceil(N * G * bits / 8)]``, row-major, each code ``bits``
    bits (signed ones with the bias ``2^(bits-1)-1`` added)."""
    from slimc.lowbit import pack_bits

    flat = code.reshape(-1).to(torch.int16) + (levels(bits)[1] if signed else 0)
    total = flat.numel()
    padded = torch.zeros(-(-total // 8) * 8, dtype=torch.uint8)
    padded[:total] = flat.to(torch.uint8)
    return pack_bits(padded.reshape(1, -1), bits)[0, :-(-total * bits // 8)].contiguous()


def unpack_codes(packed: Tensor, bits: int, n: int, groups: int, signed: bool = False) -> Tensor:
    """Inverse of :func:`pack_codes`: ``uint8`` (or ``int8`` when ``signed``) ``[n, groups]``."""
    from slimc.lowbit import unpack_bits

    total = n * groups
    width = -(-total // 8) * bits
    full = torch.zeros(width, dtype=torch.uint8)
    full[:packed.numel()] = packed
    codes = unpack_bits(full.reshape(1, -1), bits)[0, :total].reshape(n, groups)
    if signed:
        return (codes.to(torch.int16) - levels(bits)[1]).to(torch.int8)
    return codes


def decode(code: Tensor, unit: Tensor) -> Tensor:
    """``fp16(code * unit)`` per (row, group): ``code [N, G]``, ``unit [N]`` (or ``[N, 1]``)."""
    return (code.float() * unit.float().reshape(-1, 1)).half()


def _unit(top: Tensor, levels: int) -> Tensor:
    return (top / levels).clamp(UNIT_FLOOR, 65504.0).half()


def code_grid(step: Tensor, minimum: Tensor, bits: int = 8) -> CodedGrid:
    """Round-to-nearest ``bits``-bit codes of a float grid ``step, minimum [N, G]``: each row's
    units are its largest step / (2^bits - 1) and largest |minimum| / (2^(bits-1) - 1) (fp16;
    255 and 127 at 8 bits)."""
    step_levels, min_levels = levels(bits)
    step, minimum = step.float(), minimum.float()
    scale_unit = _unit(step.amax(dim=1), step_levels)
    min_unit = _unit(minimum.abs().amax(dim=1), min_levels)
    scale_code = torch.round(step / scale_unit.float()[:, None]).clamp(1, step_levels)
    min_code = torch.round(minimum / min_unit.float()[:, None]).clamp(-min_levels, min_levels)
    return CodedGrid(scale_code.to(torch.uint8), min_code.to(torch.int8), scale_unit, min_unit,
                     bits)


@torch.library.custom_op("slimc::coded_scale", mutates_args=())
def coded_scale(code: Tensor, unit: Tensor, like: Tensor, bits: int = 8, groups: int = 0,
                signed: bool = False) -> Tensor:
    """The fp16 grid ``[N, G]`` of 8-bit codes ``[N, G]``, or of ``bits``-bit codes packed by
    :func:`pack_codes` (``groups`` per row, ``signed``: minimum codes)."""
    if bits < 8:
        code = unpack_codes(code, bits, unit.shape[0], groups, signed)
    return decode(code, unit)


@coded_scale.register_fake
def _(code, unit, like, bits=8, groups=0, signed=False):
    shape = code.shape if bits >= 8 else (unit.shape[0], groups)
    return code.new_empty(shape, dtype=torch.float16)


def _setup(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output)


def _backward(ctx, grad):
    return None, None, None, None, None, None


# The rebuilt grid is fixed: its codes are integers and its units are stored, not trained
# (``distill{scales=true}`` leaves ``-qs`` grids as they are). Registered so autograd passes
# through the graph (``like`` is an activation) instead of stopping at an opaque op.
torch.library.register_autograd("slimc::coded_scale", _backward, setup_context=_setup)
