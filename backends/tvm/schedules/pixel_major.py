"""Spatial reductions of a channels-last map (global average pool) read the map in memory order.

A squeeze-excite's squeeze is the mean over H, W of an NHWC map into 1 x 1 x C. The fallback
rule vectorizes C and keeps the pixel loops inside the channel-vector loop: one pass over the
map per vector of channels, reading one cache line per pixel at a stride of the whole pixel
(C floats). Hot in cache that is fine (EfficientNet-B0's 14 x 14 x 672 mean: 11 us); in the
network the map was just written by the two cores of the conv before it, and the strided
walks fetch it line by line from the other core's cache and L3, at latency: 84 us, 8x, and
the 17 squeezes of B0 lost 0.64 ms of a 12.9 ms call to it (``benchmarks/call_gap.py``).

Here the pixel loops go outside all but a group of up to :data:`ACCUMULATORS` channel vectors:
each pass reads every pixel's group of channels contiguously (whole cache lines, in memory
order, which the prefetchers follow) into accumulators held in registers. When the map is
large enough to be worth a parallel launch (:data:`.common.MIN_PARALLEL_MEMORY_WORK`), the
outermost pixel loop (image rows) is ``rfactor``-ed: each thread sums its own rows into their
own partial rows -- the rows the producing conv's parallel row loop wrote, so each core mostly
reads its own cache -- and a last small block adds the per-row partials.
"""

from __future__ import annotations

from tvm import s_tir

from . import common
from .common import extent, vector_lanes

#: Partial sums (rows x output elements) kept per call, at most: 256 KiB of float32.
MAX_PARTIAL_ELEMENTS = 1 << 16
#: Vectors of channels summed per pass over the pixels: their accumulators stay in registers,
#: and each pixel is read as a run of up to this many vectors (a few whole cache lines).
ACCUMULATORS = 8
#: Output elements at most: a squeeze's one value per channel, not a pooling window's map.
MAX_OUTPUT_ELEMENTS = 1 << 13


def schedule_pixel_major(sch: s_tir.Schedule, block, target, loop_kinds, contiguous) -> bool:
    """Schedule ``block`` (a reduction of a channels-last map) pixel-major; False: not one.

    ``loop_kinds(sch, block, loops)`` and ``contiguous(stmt, var, loops, sch)`` are the fallback
    rule's loop classification and contiguity test (passed in to keep one copy of each).
    """
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if not loops or len(loops) != len(stmt.iter_vars):
        return False
    kinds = loop_kinds(sch, block, loops)
    if kinds is None or "R" not in kinds or "S" not in kinds:
        return False
    spatial = [lp for lp, k in zip(loops, kinds, strict=True) if k == "S"]
    reduce = [lp for lp, k in zip(loops, kinds, strict=True) if k == "R"]
    sizes = [extent(sch, lp) for lp in loops]
    if any(s is None for s in sizes) or not contiguous(stmt, sch.get(spatial[-1]).loop_var,
                                                       loops, sch):
        return False
    outputs = _product(extent(sch, lp) for lp in spatial)
    pixels = _product(extent(sch, lp) for lp in reduce)
    lanes = vector_lanes(target, stmt.writes[0].source.dtype.bits if stmt.writes else 32)
    channels = extent(sch, spatial[-1])
    vec = next((v for v in (lanes, lanes // 2, 4) if v >= 4 and channels % v == 0), 0)
    # a squeeze: few outputs, many pixels each, whole vectors of channels
    if not vec or outputs > MAX_OUTPUT_ELEMENTS or pixels < 16:
        return False
    rows = extent(sch, reduce[0])
    parallel = (outputs * pixels >= common.MIN_PARALLEL_MEMORY_WORK and rows >= 2
                and rows * outputs <= MAX_PARTIAL_ELEMENTS)
    if parallel:
        at = kinds.index("R")  # rfactor keeps the loop nest: the row loop stays at its place
        partial = sch.rfactor(reduce[0], factor_axis=0)
        _pixel_loops_outside(sch, partial, loop_kinds, vec, at)
        # the sum over rows: few outputs, serial, vectorized over channels
        from .fallback import schedule_block

        schedule_block(sch, block, target)
    else:  # a batch of maps (token mean pooling of 8 sequences) still splits over threads
        _pixel_loops_outside(sch, block, loop_kinds, vec, None,
                             outputs * pixels >= common.MIN_PARALLEL_MEMORY_WORK)
    return True


def _pixel_loops_outside(sch: s_tir.Schedule, block, loop_kinds, vec: int,
                         row_at: int | None, parallel_outputs: bool = False) -> None:
    """Loops of ``block`` reordered to (pixel loops, channel loops, vector lanes); the loop at
    ``row_at`` (the one ``rfactor`` made a spatial loop of the partial block) outermost and
    parallel; else, with ``parallel_outputs``, the output loops outside the pixels are."""
    loops = sch.get_loops(block)
    kinds = loop_kinds(sch, block, loops)
    if kinds is None:
        raise ValueError("partial block's loops do not map one to one onto its iterators")
    rows = None
    if row_at is not None:
        rows = loops[row_at]
        loops, kinds = loops[:row_at] + loops[row_at + 1:], kinds[:row_at] + kinds[row_at + 1:]
    parallel_rows = rows is not None
    spatial = [lp for lp, k in zip(loops, kinds, strict=True) if k == "S"]
    reduce = [lp for lp, k in zip(loops, kinds, strict=True) if k == "R"]
    outer, inner = sch.split(spatial[-1], factors=[None, vec])
    vectors = extent(sch, outer)
    chunk = max(d for d in range(1, ACCUMULATORS + 1) if vectors % d == 0)
    group, lane_vectors = sch.split(outer, factors=[None, chunk])
    order = ([rows] if parallel_rows else []) + spatial[:-1] + [group] + reduce \
        + [lane_vectors, inner]
    sch.reorder(*order)
    sch.unroll(lane_vectors)
    sch.vectorize(inner)
    if parallel_rows:
        common.parallelize(sch, rows, common.MIN_PARALLEL_MEMORY_WORK)
    elif parallel_outputs:
        outside = spatial[:-1] + [group]
        fused = sch.fuse(*outside) if len(outside) > 1 else outside[0]
        if (extent(sch, fused) or 0) > 1:
            common.parallelize(sch, fused, common.MIN_PARALLEL_MEMORY_WORK)
    # the zeroing as its own vector loop before the pixels, not a test in the innermost loop
    init = sch.decompose_reduction(block, reduce[0])
    init_loops = sch.get_loops(init)
    if init_loops and extent(sch, init_loops[-1]) == vec:
        sch.vectorize(init_loops[-1])


def _product(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out
