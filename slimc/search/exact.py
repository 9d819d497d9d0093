"""Choices that lose nothing: weights that already lie on a format's grid
(:mod:`slimc.passes.quantize.exact` decides which).

Why: many checkpoints were dequantized from a quantized file. SmolLM2-135M as slimc gets it is
a GGUF Q4_1 converted to fp32: 210 of its 211 weight matrices sit exactly on int4-g32-fz grids
(fp16 scale and minimum per 32 weights), and only its embedding table (another GGUF type) does
not. Rounding such a weight to its own grid changes nothing, so the cheapest exact format of
every layer (fp32 where none is exact) is a *lossless* candidate: when it fits the budget no
other choice can be closer to the original model, and the search ends there without its damage
table (25 minutes on SmolLM2 on 2 cores). Where it does not fit, the damage table prices those
choices at zero anyway.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from slimc.ir import IR
from slimc.passes.quantize.exact import cheapest_exact

from .space import Space


@dataclass
class Lossless:
    """The cheapest exact choice of every layer of a space (0, fp32, where none is)."""

    picks: list[int]
    #: Exact layers per format name.
    formats: Counter = field(default_factory=Counter)

    @property
    def exact_layers(self) -> int:
        return sum(self.formats.values())


def exact_picks(ir: IR, space: Space) -> Lossless:
    """Per layer of ``space``, the option of fewest bytes whose weight format reproduces the
    layer's weight exactly (low-rank options never do; fp32, option 0, when nothing does)."""
    found = Lossless(picks=[0] * len(space.layers))
    for i, choice in enumerate(space.layers):
        index = {o.fmt: j for j, o in enumerate(choice.options)
                 if o.rank is None and o.fmt.kind != "fp32"}
        fmt = cheapest_exact(choice.layer.matrix(ir), list(index))
        if fmt is not None:
            found.picks[i] = index[fmt]
            found.formats[str(fmt)] += 1
    return found
