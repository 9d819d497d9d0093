"""Weight-bearing layers of an IR: the unit that cost and sensitivity are reported per.

The recognizer itself is an IR service shared by every analysis and transform
(:mod:`slimc.layers`); this module keeps the analysis-side names.
"""

from __future__ import annotations

from slimc.ir import IR
from slimc.layers import Layer, Use, op_name

__all__ = ["Layer", "Use", "op_name", "weight_layers"]


def weight_layers(ir: IR) -> list[Layer]:
    """Every floating-point weight read by a weight op (linear, matmul against a weight in
    any orientation, convolution, embedding, batched experts), in graph order."""
    from slimc.layers import find_layers

    return find_layers(ir)
