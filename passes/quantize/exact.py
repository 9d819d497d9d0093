"""Formats a weight already lies on exactly: ``quantize{weights=exact}`` and the budget
search's lossless candidate (:mod:`slimc.search.exact`).

Why: many checkpoints were dequantized from a quantized file or stored in half precision and
loaded as fp32. SmolLM2-135M as slimc gets it is a GGUF Q4_1 converted to fp32: 210 of its
211 weight matrices sit exactly on int4-g32-fz grids (fp16 scale and minimum per 32 weights,
Q4_1's layout); a bf16 checkpoint's every weight is exact in bf16. Rounding such a weight to
its own grid changes nothing, so storing it there is lossless: a third of the bytes for
SmolLM2 (docs/benchmarks.md, session 28), half for a bf16 model, with the same outputs.
"""

from __future__ import annotations

import torch

from slimc.ir import IR
from slimc.layers import Layer

from .formats import Format, _grouped, fake_quantize_rows, parse_format

#: A format is exact for a weight when its round trip moves no element by more than this
#: share of the weight's largest |value|. Re-deriving a file's fp16 group scale and minimum
#: in fp32 errs by ~1e-7 of it; rounding a float32 weight to fp16 errs by up to 2.4e-4 of an
#: element near the largest, a real 8-bit grid by ~2e-3, a 4-bit one by ~3e-2.
EXACT_TOLERANCE = 1e-6
#: Rows the cheap tests read (distinct values per group, the plain grid) and a non-searched
#: format's round trip tries first: a non-exact layer costs 64 rows per format, not all.
SAMPLE_ROWS = 64
#: What ``weights=exact`` tries, each layer's cheapest first (by its bytes for that shape):
#: the grids of common quantized files (GGUF Q4_1 = int4-g32-fz) and half precision.
EXACT_FORMATS = ("int2-g32", "int2-g64", "int3-g64", "int3-g128", "int4-g128-fz",
                 "int4-g128", "int4-g64-fz", "int4-g64", "int4-g32-fz", "int4-g32",
                 "int4-g32-sym", "int8", "bf16", "fp16")


def levels(fmt: Format) -> int | None:
    """Most distinct values one group (a row for int8) of ``fmt`` holds; None for floats."""
    if fmt.kind in ("fp16", "bf16"):
        return None
    return 256 if fmt.kind == "int8" else 2 ** fmt.code_bits


@torch.no_grad()
def most_distinct(rows: torch.Tensor, group: int) -> int:
    """The most distinct values in any group of ``group`` consecutive inputs of ``rows``
    (a short last group is padded with its own last value: no new value)."""
    ordered = _grouped(rows, group).sort(dim=-1).values
    return int(((ordered[..., 1:] != ordered[..., :-1]).sum(-1) + 1).max())


class ExactCheck:
    """One weight matrix (a layer's ``[rows, reduction]`` weight), asked format by format
    whether rounding it to that format returns it unchanged, within :data:`EXACT_TOLERANCE`.

    Cheap tests first: a weight on a grid of ``2^b`` levels per group has at most that many
    distinct values in each group of its first :data:`SAMPLE_ROWS` rows (a trained float
    weight has as many as the group has inputs), and a searched grid's format is tried only
    when the sample lies on the plain ``[min, max]`` grid; only then the real round trip,
    whose grid search is the slow part (~0.1-1 s a layer and format)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.weight = matrix.float()
        self.limit = EXACT_TOLERANCE * float(self.weight.abs().max())
        self.sample = self.weight[:SAMPLE_ROWS]
        self._distinct: dict[int, int] = {}

    @torch.no_grad()
    def __call__(self, fmt: Format) -> bool:
        if not 0.0 < self.limit < float("inf"):
            return False  # all zeros: nothing to decide; NaN / inf: no tolerance means anything
        most = levels(fmt)
        if most is not None:
            group = fmt.group_size or self.weight.shape[1]
            if group not in self._distinct:
                self._distinct[group] = most_distinct(self.sample, group)
            if self._distinct[group] > most:
                return False
        searched = fmt.float_zero or fmt.lowbit or fmt.coded_scales
        if searched and not _on_min_max_grid(self.sample, fmt, self.limit):
            return False
        small = self.weight.shape[0] <= SAMPLE_ROWS
        for part in (self.weight,) if searched or small else (self.sample, self.weight):
            if float((fake_quantize_rows(part, fmt) - part).abs().max()) > self.limit:
                return False
        return True


@torch.no_grad()
def _on_min_max_grid(rows: torch.Tensor, fmt: Format, limit: float) -> bool:
    """Whether ``rows`` lie on each group's ``[min, max]`` grid of ``fmt``'s levels with fp16
    step and minimum (GGUF Q4_1's grid). The formats with a float minimum search their grid
    (shrunk ranges, refits: ~0.1-1 s a layer) among candidates that include this one, so a
    weight on it is exact there too; off it, no shrunk range can hold the group's ends."""
    grouped = _grouped(rows, fmt.group_size or rows.shape[1])
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    top = 2 ** fmt.code_bits - 1
    step = ((high - low) / top).half().float().clamp_min(1e-12)
    minimum = low.half().float()
    back = ((grouped - minimum) / step).round().clamp(0, top) * step + minimum
    return float((back - grouped).abs().max()) <= limit


def storable(layer: Layer, fmt: Format, kinds: frozenset[str] | set[str], width: int) -> bool:
    """Whether the quantize pass stores ``layer`` (``width`` inputs per row) in ``fmt`` as
    such, given the target's weight ``kinds`` (:attr:`TargetInfo.formats`): fp16/bf16 have no
    gather or convolution op, int3/int2 and coded scales exist for linears and gathers only,
    an odd-width int4 table becomes int8."""
    if fmt.kind not in kinds or (fmt.coded_scales and "qs" not in kinds):
        return False
    special = layer.is_embedding or layer.kind in ("conv", "expert")
    if fmt.kind in ("fp16", "bf16"):
        return not special
    if (fmt.lowbit or fmt.coded_scales) and layer.kind in ("conv", "expert"):
        return False
    return not (fmt.kind == "int4" and (layer.is_embedding or layer.kind == "expert")
                and width % 2)


def cheapest_exact(matrix: torch.Tensor, candidates: list[Format]) -> Format | None:
    """The candidate of fewest bytes for ``matrix`` (a layer's ``[rows, reduction]`` weight)
    that reproduces it; None when none does."""
    n, k = (int(d) for d in matrix.shape)
    check = ExactCheck(matrix)
    return next((f for f in sorted(candidates, key=lambda f: f.nbytes(n, k)) if check(f)),
                None)


def exact_formats(ir: IR, layers: list[Layer],
                  kinds: frozenset[str] | set[str]) -> dict[str, Format]:
    """``weights=exact``: every layer's cheapest exact format of :data:`EXACT_FORMATS` the
    target stores, fp32 where none is exact."""
    parsed = [parse_format(f) for f in EXACT_FORMATS]
    out = {}
    for layer in layers:
        matrix = layer.matrix(ir)
        usable = [f for f in parsed if storable(layer, f, kinds, int(matrix.shape[1]))]
        out[layer.name] = cheapest_exact(matrix, usable) or Format("fp32")
    return out
