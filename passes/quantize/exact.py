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

from .formats import Format, fake_quantize_rows, parse_format

#: A format is exact for a weight when its round trip moves no element by more than this
#: share of the weight's largest |value|. Re-deriving a file's fp16 group scale and minimum
#: in fp32 errs by ~1e-7 of it; rounding a float32 weight to fp16 errs by up to 2.4e-4 of an
#: element near the largest, a real 8-bit grid by ~2e-3, a 4-bit one by ~3e-2.
EXACT_TOLERANCE = 1e-6
#: Rows tried first: a format that does not reproduce them is not tried on the whole matrix
#: (one non-exact layer costs a 64-row round trip per format, not a full one).
SAMPLE_ROWS = 64
#: What ``weights=exact`` tries, each layer's cheapest first (by its bytes for that shape):
#: the grids of common quantized files (GGUF Q4_1 = int4-g32-fz) and half precision.
EXACT_FORMATS = ("int2-g32", "int2-g64", "int3-g64", "int3-g128", "int4-g128-fz",
                 "int4-g128", "int4-g64-fz", "int4-g64", "int4-g32-fz", "int4-g32",
                 "int4-g32-sym", "int8", "bf16", "fp16")


@torch.no_grad()
def reproduces(matrix: torch.Tensor, fmt: Format) -> bool:
    """Whether rounding ``matrix`` (a layer's ``[rows, reduction]`` weight) to ``fmt``
    returns it unchanged, within :data:`EXACT_TOLERANCE`."""
    weight = matrix.float()
    limit = EXACT_TOLERANCE * float(weight.abs().max())
    if limit == 0.0:
        return False  # an all-zero weight: nothing worth deciding on
    for part in (weight[:SAMPLE_ROWS], weight) if weight.shape[0] > SAMPLE_ROWS else (weight,):
        if float((fake_quantize_rows(part, fmt) - part).abs().max()) > limit:
            return False
    return True


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


def cheapest_exact(ir: IR, layer: Layer, candidates: list[Format],
                   kinds: frozenset[str] | set[str]) -> Format | None:
    """The candidate of fewest bytes the target stores ``layer`` in that reproduces its
    weight; None when none does."""
    matrix = layer.matrix(ir)
    n, k = (int(d) for d in matrix.shape)
    usable = [f for f in candidates if storable(layer, f, kinds, k)]
    for fmt in sorted(usable, key=lambda f: f.nbytes(n, k)):
        if reproduces(matrix, fmt):
            return fmt
    return None


def exact_formats(ir: IR, layers: list[Layer],
                  kinds: frozenset[str] | set[str]) -> dict[str, Format]:
    """``weights=exact``: every layer's cheapest exact format of :data:`EXACT_FORMATS` the
    target stores, fp32 where none is exact."""
    parsed = [parse_format(f) for f in EXACT_FORMATS]
    return {layer.name: cheapest_exact(ir, layer, parsed, kinds) or Format("fp32")
            for layer in layers}
