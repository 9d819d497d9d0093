"""Row-wise reductions: softmax, layer norm, RMS norm, mean/variance, pooling over the last axis.

TVM ships a CPU rule for exactly this pattern (``tvm.s_tir.dlight.cpu.Reduction``: parallel over
rows, every block of the row computed under that loop so the row stays in L1, injective blocks
vectorized). This module narrows it to the functions it handles safely and inlines the
elementwise blocks TVM's legalizer adds around them (masks, casts, broadcasts) first, which the
TVM rule cannot see through.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from .common import inline_spatial, intermediate_buffers, is_spatial


class RowReduction:
    """Softmax / norm rule: delegates the loop nest to dlight's CPU ``Reduction``."""

    name = "row-reduction"

    def apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        from tvm.s_tir.dlight.cpu import Reduction

        sch = s_tir.Schedule(func)
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
        if all(is_spatial(sch, b) for b in blocks):
            return None
        inline_spatial(sch, blocks, intermediate_buffers(sch), keep_reduction_inputs=True)
        return Reduction().apply(sch.mod["main"], target, False)
