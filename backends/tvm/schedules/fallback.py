"""Fallback rule: parallel outer loops + vectorized inner loop for any kernel.

Used for everything the specialised rules do not claim (elementwise, broadcast, transpose,
gather, pooling, odd reductions). It never changes what is computed, only the loop nest: spatial
loops are fused into one parallel loop, the innermost spatial loop is vectorized when its trip
count allows it without a tail (or, when it is symbolic, in whole vectors with the tail peeled off
by ``symbolic_tails``), and reductions stay serial inside each parallel iteration.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from slimc import interrupts

from . import common
from .common import (
    extent,
    inline_spatial,
    intermediate_buffers,
    log,
    realize_bindings,
    vars_in,
    vector_lanes,
)
from .pixel_major import schedule_pixel_major

#: An innermost spatial axis of at most this many elements that no vector covers is unrolled
#: (:func:`_short_inner_axis`; 0: fused with the others, as before).
SHORT_INNER_AXIS = 3
#: ... over the threads from this many elements (scalar loads and stores: a quarter of the
#: vectorized blocks' :data:`~.common.MIN_PARALLEL_MEMORY_WORK`).
SHORT_INNER_PARALLEL_WORK = common.MIN_PARALLEL_MEMORY_WORK // 4
#: Input elements per row a transposing copy reads at a time (:func:`_tiled_transpose`).
TRANSPOSE_TILE = 16


class Fallback:
    """Parallelize and vectorize every block of a PrimFunc (never returns None for valid IR)."""

    name = "fallback"

    def apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
        blocks = inline_spatial(sch, list(sch.get_child_blocks(root)), intermediate_buffers(sch))
        for block in blocks:
            try:
                if not schedule_pixel_major(sch, block, target, _loop_kinds,
                                            _contiguous_innermost):
                    schedule_block(sch, block, target)
            except Exception as exc:  # noqa: BLE001 - keep this block's loops as they were
                interrupts.check()  # a swallowed Ctrl-C/SIGTERM stops here
                log.debug("fallback: block %s left unscheduled: %s", sch.get(block).name_hint,
                          _first_line(exc))
        return sch


def schedule_block(sch: s_tir.Schedule, block, target: Target) -> None:
    """Parallel spatial loops, vectorized innermost spatial loop, serial reduction loops."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if not loops or len(loops) != len(stmt.iter_vars):
        return
    kinds = _loop_kinds(sch, block, loops)
    if kinds is None:
        return
    spatial = [lp for lp, k in zip(loops, kinds, strict=True) if k == "S"]
    reduce = [lp for lp, k in zip(loops, kinds, strict=True) if k == "R"]
    if not spatial:
        return
    dtype_bits = stmt.writes[0].source.dtype.bits if stmt.writes else 32
    lanes = vector_lanes(target, dtype_bits)
    last = spatial[-1]
    n = extent(sch, last)
    vec = next((v for v in (lanes, lanes // 2, 4) if n and v >= 4 and n % v == 0), 0)
    if n is None:  # a symbolic length: whole vectors, the tail peeled off (symbolic_tails)
        vec = lanes
    # A reduction is vectorized across its innermost output axis (pooling / mean over H, W of
    # an NHWC tensor) only when that axis is contiguous everywhere; else it stays serial.
    if reduce and not _contiguous_innermost(stmt, sch.get(last).loop_var, loops, sch):
        vec = 0
    if not vec and not reduce and n is not None and 1 < n <= SHORT_INNER_AXIS \
            and len(spatial) > 1 and _short_inner_axis(sch, spatial, last):
        return
    if vec == lanes and not reduce and _tiled_transpose(sch, block, spatial, lanes):
        return
    order = spatial[:-1] + reduce + [last] if vec and reduce else spatial + reduce
    if [sch.get(lp).loop_var for lp in order] != [sch.get(lp).loop_var for lp in loops]:
        sch.reorder(*order)
    inner_work = vec or 1
    for lp in reduce:
        inner_work *= extent(sch, lp) or 64
    outer_spatial = spatial
    if vec:
        if n is None or n > vec:
            outer, inner = sch.split(last, factors=[None, vec])
            sch.vectorize(inner)
            if reduce:  # keep the outer part of the split with the other parallel loops
                sch.reorder(*spatial[:-1], outer, *reduce)
            outer_spatial = spatial[:-1] + [outer]
            if n is None and _enough_rows(sch, spatial[:-1]):
                # the chunk loop stays serial, outside the parallel loop, so that its
                # predicated tail can be peeled off (a fused loop cannot be partitioned)
                outer_spatial = spatial[:-1]
                inner_work *= 8
        else:
            sch.vectorize(last)
            outer_spatial = spatial[:-1]
    if not outer_spatial:
        return
    fused = sch.fuse(*outer_spatial) if len(outer_spatial) > 1 else outer_spatial[0]
    trips = extent(sch, fused)
    if trips is None or (trips > 1 and trips * inner_work >= common.MIN_PARALLEL_MEMORY_WORK):
        common.parallelize(sch, fused, common.MIN_PARALLEL_MEMORY_WORK)


def _tiled_transpose(sch: s_tir.Schedule, block, spatial: list, lanes: int) -> bool:
    """Schedule a transposing copy in tiles of :data:`TRANSPOSE_TILE` x ``lanes``; False
    (nothing changed) when ``block`` reads no operand across its output's innermost axis.

    Why: vectorized along the output's innermost axis alone, an NCHW -> NHWC transpose
    reads one float from each of ``lanes`` input rows per vector, rows a whole plane apart;
    with 32 x 32 planes (4 KiB) every row falls in the same L1 set and the lines are evicted
    before their next float is read: MobileViTV2's 128 x 32 x 32 transposes ran at ~1.7 GB/s,
    0.30 ms each (1.5 ms of a 12.7 ms call), 0.048 ms tiled (session 27, Zen 5). A tile
    reads :data:`TRANSPOSE_TILE` consecutive floats of each input row it touches, so each
    line is used whole while it is in L1, and writes whole vectors."""
    stmt = sch.get(block)
    last = spatial[-1]
    bindings = realize_bindings(sch, spatial)
    if bindings is None or any(extent(sch, lp) is None for lp in spatial):
        return False
    iter_vars = [(lp, _bound_iter_var(stmt, bindings, sch.get(lp).loop_var)) for lp in spatial]
    inner = iter_vars[-1][1]
    if inner is None:
        return False
    read_loop = None
    for region in stmt.reads:
        idx = [r.min for r in region.region]
        if not idx or not isinstance(idx[-1], tirx.Var) or idx[-1].same_as(inner) \
                or not any(inner in vars_in(e) for e in idx[:-1]):
            continue
        read_loop = next((lp for lp, v in iter_vars if v is not None and v.same_as(idx[-1])),
                         None)
        if read_loop is not None:
            break
    if read_loop is None or extent(sch, read_loop) % TRANSPOSE_TILE \
            or extent(sch, last) % lanes:
        return False
    work = 1
    for lp in spatial:
        work *= extent(sch, lp)
    outer_read, inner_read = sch.split(read_loop, factors=[None, TRANSPOSE_TILE])
    outer_write, inner_write = sch.split(last, factors=[None, lanes])
    others = [lp for lp in spatial if lp not in (read_loop, last)]
    sch.reorder(*others, outer_read, outer_write, inner_read, inner_write)
    sch.vectorize(inner_write)
    fused = sch.fuse(*others, outer_read) if others else outer_read
    if extent(sch, fused) > 1 and work >= common.MIN_PARALLEL_MEMORY_WORK:
        common.parallelize(sch, fused, common.MIN_PARALLEL_MEMORY_WORK)
    return True


def _short_inner_axis(sch: s_tir.Schedule, spatial: list, last) -> bool:
    """Schedule a spatial block whose innermost axis is too short for a vector (an NCHW ->
    NHWC transpose of an RGB image: ``[1, 224, 224, 3]``): that axis unrolled, the loops
    outside it kept apart unless they are made parallel. Returns False (nothing changed)
    when an extent is symbolic.

    Why: fused into one loop with the short axis, every element computes its indices by a
    division and a modulo by the row and by 3; the 224 x 224 x 3 input transpose of the
    ImageNet CNNs (one thread: 150,528 elements) took ~100 us hot, 1.5-2% of MobileNetV2.
    Unrolled, each pixel is three loads from the channel planes and three stores.
    """
    sizes = [extent(sch, lp) for lp in spatial]
    if any(size is None for size in sizes):
        return False
    work = 1
    for size in sizes:
        work *= size
    sch.unroll(last)
    outer = spatial[:-1]
    if work >= SHORT_INNER_PARALLEL_WORK and work // sizes[-1] > 1:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        common.parallelize(sch, fused, SHORT_INNER_PARALLEL_WORK)
    return True


def _enough_rows(sch: s_tir.Schedule, loops, minimum: int = 8) -> bool:
    """Whether ``loops`` alone (symbolic ones count as many) give a parallel loop enough
    iterations to share among the cores."""
    if not loops:
        return False
    rows = 1
    for loop in loops:
        size = extent(sch, loop)
        if size is None:
            return True
        rows *= size
    return rows >= minimum


def _bound_iter_var(stmt, bindings, loop_var):
    """The block iterator of ``stmt`` bound to exactly ``loop_var`` (``bindings``: the
    iterators' bindings, :func:`~.common.realize_bindings`), or None."""
    return next((iv.var for iv, b in zip(stmt.iter_vars, bindings, strict=True)
                 if isinstance(b, tirx.Var) and b.same_as(loop_var)), None)


def _contiguous_innermost(stmt, loop_var, loops, sch) -> bool:
    """Whether the block iterator bound to ``loop_var`` indexes only the last axis of every
    buffer it touches (so vector loads/stores along it are contiguous)."""
    ivar = _bound_iter_var(stmt, realize_bindings(sch, loops), loop_var)
    if ivar is None:
        return False
    for region in [*stmt.writes, *stmt.reads]:
        idx = [r.min for r in region.region]
        if any(ivar in vars_in(e) for e in idx[:-1]):
            return False
    out = [r.min for r in stmt.writes[0].region]
    return bool(out) and isinstance(out[-1], tirx.Var) and out[-1].same_as(ivar)


def _loop_kinds(sch: s_tir.Schedule, block, loops) -> list[str] | None:
    """"S"/"R" per loop when each loop drives exactly one block iterator, else None."""
    stmt = sch.get(block)
    bindings = realize_bindings(sch, loops)
    if bindings is None:
        return None
    kinds = []
    for loop in loops:
        var = sch.get(loop).loop_var
        users = [iv for iv, b in zip(stmt.iter_vars, bindings, strict=True)
                 if isinstance(b, tirx.Var) and b.same_as(var)]
        if len(users) != 1:
            return None
        if users[0].iter_type == tirx.IterVar.DataPar:
            kinds.append("S")
        elif users[0].iter_type == tirx.IterVar.CommReduce:
            kinds.append("R")
        else:
            return None
    return kinds


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(exc).__name__
