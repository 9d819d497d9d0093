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

#: Largest step code (unsigned) and largest |minimum code| (signed).
STEP_LEVELS = 255
MIN_LEVELS = 127
#: fp16's smallest normal value: the smallest row unit (a row of zeros still decodes).
UNIT_FLOOR = 2.0 ** -14


@dataclass
class CodedGrid:
    """A ``-qs`` grid: 8-bit codes of each group's step and minimum, fp16 units per row."""

    scale_code: Tensor  # uint8 [N, G]
    min_code: Tensor  # int8 [N, G]
    scale_unit: Tensor  # float16 [N]
    min_unit: Tensor  # float16 [N]

    def decoded(self) -> tuple[Tensor, Tensor]:
        """The fp16 ``(step, minimum)`` per (row, group) the kernels read."""
        return decode(self.scale_code, self.scale_unit), decode(self.min_code, self.min_unit)

    def tensors(self) -> dict[str, Tensor]:
        return {"scale_code": self.scale_code, "min_code": self.min_code,
                "scale_unit": self.scale_unit, "min_unit": self.min_unit}


def decode(code: Tensor, unit: Tensor) -> Tensor:
    """``fp16(code * unit)`` per (row, group): ``code [N, G]``, ``unit [N]`` (or ``[N, 1]``)."""
    return (code.float() * unit.float().reshape(-1, 1)).half()


def _unit(top: Tensor, levels: int) -> Tensor:
    return (top / levels).clamp(UNIT_FLOOR, 65504.0).half()


def code_grid(step: Tensor, minimum: Tensor) -> CodedGrid:
    """Round-to-nearest codes of a float grid ``step, minimum [N, G]``: each row's units are its
    largest step / 255 and largest |minimum| / 127 (fp16)."""
    step, minimum = step.float(), minimum.float()
    scale_unit = _unit(step.amax(dim=1), STEP_LEVELS)
    min_unit = _unit(minimum.abs().amax(dim=1), MIN_LEVELS)
    scale_code = torch.round(step / scale_unit.float()[:, None]).clamp(1, STEP_LEVELS)
    min_code = torch.round(minimum / min_unit.float()[:, None]).clamp(-MIN_LEVELS, MIN_LEVELS)
    return CodedGrid(scale_code.to(torch.uint8), min_code.to(torch.int8), scale_unit, min_unit)


@torch.library.custom_op("slimc::coded_scale", mutates_args=())
def coded_scale(code: Tensor, unit: Tensor, like: Tensor) -> Tensor:
    return decode(code, unit)


@coded_scale.register_fake
def _(code, unit, like):
    return code.new_empty(code.shape, dtype=torch.float16)


def _setup(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output)


def _backward(ctx, grad):
    return None, None, None


# The rebuilt grid is fixed: its codes are integers and its units are stored, not trained
# (``distill{scales=true}`` leaves ``-qs`` grids as they are). Registered so autograd passes
# through the graph (``like`` is an activation) instead of stopping at an opaque op.
torch.library.register_autograd("slimc::coded_scale", _backward, setup_context=_setup)
