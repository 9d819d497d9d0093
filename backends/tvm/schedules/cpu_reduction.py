"""Row-wise reductions: softmax, layer norm, RMS norm (a reduction, then elementwise per row).

The loop nest follows TVM's own CPU rule (``tvm.s_tir.dlight.cpu.Reduction``, Apache-2.0):
leading spatial axes fused into one row loop, every block of the function computed under it
so a row stays in L1, elementwise blocks vectorized, reductions split into vector-sized chunks
and unrolled. Two changes make it fit slimc's models:

* elementwise blocks that feed a reduction are kept (not inlined) so an expensive ``exp`` is
  computed once, vectorized, instead of once per consumer inside a scalar reduction loop; the
  masks, casts and broadcasts TVM's legalizer adds around a softmax are inlined first;
* the row loop is parallel only when there is enough work: a decode step normalizes a single
  row, and waking the thread pool for it costs more than the row (badly so on a loaded host);
* a row's sum / max is computed in vector lanes with a few independent accumulators
  (``rfactor``), not as one scalar dependency chain (``_factor_in_lanes``);
* rows whose kept intermediate would not fit on the stack (long or symbolic-length softmax
  rows) are computed a few at a time, sharing one scratch allocation (``_rows_per_chunk``).
"""

from __future__ import annotations

from typing import NamedTuple

from tvm import s_tir, tirx
from tvm.target import Target

from slimc import interrupts

from . import common
from .common import (
    extent,
    inline_spatial,
    intermediate_buffers,
    is_spatial,
    log,
    vars_in,
    vector_lanes,
)


class RowReduction:
    """Softmax / norm rule: one parallel row loop holding every block of the function."""

    name = "row-reduction"

    def apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        # Rows chunked under one scratch allocation refused the schedule on MobileViT's
        # 4 x 4 x 256 x 256 softmax (16 rows of 256 per chunk: `vectorize` of the lane
        # partials, then `parallel` of the row loop, found blocks without compact dataflow),
        # which then fell to the fallback rule's naive loops: 2.9 ms, 4x ONNX Runtime. Rows
        # one at a time still get the row loop and its vector sums.
        for chunk_rows in (True, False):
            try:
                return self._apply(func, target, chunk_rows)
            except s_tir.ScheduleError as exc:
                if not chunk_rows:
                    raise
                interrupts.check()
                log.debug("row reduction in chunks of rows: %s; one row at a time",
                          str(exc).splitlines()[0] if str(exc) else exc)
        return None

    def _apply(self, func: tirx.PrimFunc, target: Target,
               chunk_rows: bool) -> s_tir.Schedule | None:
        from tvm.s_tir.dlight.analysis import normalize_prim_func

        sch = s_tir.Schedule(func)
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
        if all(is_spatial(sch, b) for b in blocks):
            return None
        if any(_reduces_across_rows(sch.get(b)) for b in blocks if not is_spatial(sch, b)):
            return None
        inline_spatial(sch, blocks, intermediate_buffers(sch), keep_reduction_inputs=True)
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) < 2 or not infos[-1].is_injective():
            return None
        leading = None
        for info in infos:
            kinds = info.dom_kind()
            n = len(kinds) - len(kinds.lstrip("S"))
            if n == 0:
                return None
            leading = n if leading is None else min(leading, n)
        last = infos[-1].block_rv
        stmt = sch.get(last)
        lanes = vector_lanes(target, stmt.writes[0].source.dtype.bits if stmt.writes else 32)

        # Producers first: each reduction preceded by its rfactor partials (if any).
        order = [item for info in infos[:-1]
                 for item in (_factor_in_lanes(sch, info, lanes) if not info.is_injective()
                              else []) + [info.block_rv]]
        loops = sch.get_loops(last)
        chunk, lead = (_rows_per_chunk(sch, loops[:leading], loops[leading:], infos)
                       if chunk_rows else (1, loops[:leading]))
        rows = sch.fuse(*lead) if leading > 1 else lead[0]
        rows = _row_loop(sch, rows, infos, leading)
        if rows is None:
            return None
        if chunk > 1:
            rows, _ = sch.split(rows, factors=[None, chunk])
        inits = []
        for item in reversed(order):
            if isinstance(item, _Partials):
                inits.append((item.block, _vector_partials(sch, item, rows)))
            else:
                sch.compute_at(item, rows, preserve_unit_loops=True)
        # Split the last block only now: split first, a symbolic row length would give the
        # blocks computed at the row loop a rounded-up, clipped region (min/max predicates
        # that hide the tail from ``symbolic_tails``).
        tails: list[tuple] = []
        _vectorize_inner(sch, last, lanes, tails)
        for info in infos[:-1]:
            if info.is_injective():
                _vectorize_inner(sch, info.block_rv, lanes, tails)
            else:  # a factored row's last step sums one vector: no-op there
                _unroll_reduction(sch, info.block_rv, lanes)
        n_rows = extent(sch, rows)
        row_work = 1
        for loop in sch.get_loops(last)[1:]:
            row_work *= extent(sch, loop) or 64
        if n_rows is None or (n_rows > 1 and n_rows * row_work * len(infos)
                               >= common.MIN_PARALLEL_MEMORY_WORK):
            common.parallelize(sch, rows, common.MIN_PARALLEL_MEMORY_WORK)
        for block, loop in inits:  # last: see _vector_partials
            sch.decompose_reduction(block, loop)
        for loop, whole in tails:  # last: partitioning replaces the blocks under the loop
            sch.loop_partition(loop, [whole, None])
        return sch


def _reduces_across_rows(block: tirx.SBlock) -> bool:
    """Whether ``block`` reduces over outer axes of an input whose innermost (contiguous) axis
    is one of its outputs: the mean over H, W of an NHWC feature map (squeeze-excite, global
    pooling), ``x[0, h, w, c]`` summed into ``y[c]``.

    This rule walks one output row at a time, so there it would sum each channel with a stride
    of a whole pixel, rereading the map once per channel (EfficientNet's 56 x 56 x 288 means:
    0.87 ms each, 10% of the network). The fallback rule sums such a reduction a vector of
    channels at a time, pixel by pixel, reading the map once.
    """
    reduce = {iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce}
    spatial = {iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar}
    for region in block.reads:
        index = [r.min for r in region.region]
        if not index:
            continue
        inner = vars_in(index[-1])
        if inner and inner <= spatial and any(reduce & vars_in(e) for e in index[:-1]):
            return True
    return False


def _row_loop(sch: s_tir.Schedule, rows, infos, leading: int):
    """The loop of the last block that walks the reductions' rows (None: no such loop).

    ``normalize_prim_func`` drops unit axes, so a single-row RMS norm (a decode step) has a
    reduction ``[1, R]`` but a last block ``[576]``: its leading loop walks the *columns*.
    Attaching the reduction there would recompute it for every column (measured: 0.24 ms
    instead of ~1 us per decode-step norm). Give the last block a loop of exactly the row
    count instead: a unit loop above it, or a split of its fused leading loop.
    """
    reductions = [info for info in infos if not info.is_injective()]
    if not reductions:  # rows of one element: TVM dropped the reduction
        return rows
    want = 1
    for loop in sch.get_loops(reductions[0].block_rv)[:leading]:
        size = extent(sch, loop)
        if size is None:
            return rows  # symbolic rows: trust the normalized structure
        want *= size
    have = extent(sch, rows)
    if have is None or have == want:
        return rows
    if want == 1:
        return sch.add_unit_loop(rows)
    if have % want:
        return None
    outer, _ = sch.split(rows, factors=[want, None])
    return outer


#: Scratch rows smaller than this live on the stack; TVM allocates larger or symbolic-length
#: ones from its workspace pool, once per iteration of the loop they are computed under.
STACK_SCRATCH_BYTES = 1024
#: At most this many bytes of scratch per chunk of rows (stays in L1/L2).
CHUNK_SCRATCH_BYTES = 32 * 1024


def _rows_per_chunk(sch: s_tir.Schedule, lead: list, inner: list, infos) -> tuple[int, list]:
    """How many rows to compute under one iteration of the parallel loop, and the row loops
    ``lead`` in the order to fuse them (the chunk's axis innermost).

    A kept elementwise intermediate (softmax's ``exp``) is a scratch row allocated inside the
    row loop. Small and of constant length, it goes on the stack; longer, or of symbolic
    length (a dynamic sequence), TVM takes it from the workspace pool at every row (an
    allocation and a free per row: the symbolic-length softmax of MiniLM at length 64 ran
    1.8x slower than the fixed one for that alone). Computing a few rows per iteration shares
    one allocation among them. The chunk divides a row axis of constant extent (heads), which
    goes innermost, so a chunk's rows are a box (no predicate, no wrap-around).
    """
    if not any(info.is_injective() for info in infos[:-1]):
        return 1, lead  # norms: only per-row scalars
    length = 1
    for loop in inner:
        size = extent(sch, loop)
        length = None if size is None or length is None else length * size
    if length is not None and length * 4 < STACK_SCRATCH_BYTES:
        return 1, lead
    fixed = [lp for lp in lead if (extent(sch, lp) or 1) > 1]
    if not fixed:
        return 1, lead
    axis = fixed[-1]
    size = extent(sch, axis)
    row_bytes = (length or 512) * 4
    chunk = next((c for c in (16, 12, 8, 6, 4, 3, 2)
                  if size % c == 0 and c * row_bytes <= CHUNK_SCRATCH_BYTES), 1)
    if chunk == 1:
        return 1, lead
    ordered = [lp for lp in lead if lp != axis] + [axis]
    if ordered != lead:
        sch.reorder(*ordered)
    return chunk, ordered


def _vectorize_inner(sch: s_tir.Schedule, block, lanes: int, tails: list) -> None:
    """Vectorize the innermost loop of ``block`` in vectors of ``lanes``.

    A constant row that is not whole vectors (197, 1500) gets a predicate on its last vector;
    left in every step, it makes TVM scalarize the whole row (and LLVM's SLP pass then rebuilt
    the normalize step of a softmax as gathers/scatters across rows). The chunk loop is
    appended to ``tails`` with its count of whole vectors, for the caller to split off the
    last vector (``loop_partition``) once nothing else refers to the block. Not TVM's
    ``pragma_loop_partition_hint``: ``NarrowDataType`` rewrites an int64 loop variable to
    int32 before ``LoopPartition`` runs, and the hint, still naming the old variable, is
    silently ignored (it works only for symbolic extents, which stay int64).
    """
    loops = sch.get_loops(block)
    if len(loops) <= 1:
        return
    n = extent(sch, loops[-1])
    if n is not None and n < 2:
        return
    if n is None or n > lanes:
        outer, inner = sch.split(loops[-1], factors=[None, lanes])
        sch.vectorize(inner)
        if n is not None and n % lanes:
            tails.append((outer, n // lanes))
    else:
        sch.vectorize(loops[-1])


def _unroll_reduction(sch: s_tir.Schedule, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    if len(loops) <= 1:
        return
    n = extent(sch, loops[-1])
    if n is not None and n <= lanes:
        return
    _, inner = sch.split(loops[-1], factors=[None, lanes])
    sch.annotate(inner, ann_key="pragma_auto_unroll_max_step", ann_val=lanes)
    sch.annotate(inner, ann_key="pragma_unroll_explicit", ann_val=1)


#: Independent vector accumulators per row (about a vector add's latency times its throughput).
#: 0 turns the lane reduction off: the scalar chain, for A/B benchmarks
#: (``benchmarks/row_reductions.py``).
ACCUMULATORS = 4


class _Partials(NamedTuple):
    """An ``rfactor`` block: ``width`` partial results of a row reduction, vectorized."""

    block: s_tir.schedule.SBlockRV
    width: int


def _factor_in_lanes(sch: s_tir.Schedule, info, lanes: int) -> list[_Partials]:
    """Reduce a row in vector lanes instead of one element at a time.

    A row reduction written ``acc = acc + x[i]`` is one scalar dependency chain: LLVM may not
    reassociate float adds, so it runs at one element per add latency (a 197x384 layer norm
    took 148 us against ONNX Runtime's 35). ``rfactor`` over an inner chunk of ``k * width``
    columns gives ``k`` independent vector accumulators; a second ``rfactor`` folds them into
    one vector, whose lanes the original block then sums. Returns the new blocks, producers
    first, for :func:`_vector_partials` to place under the row loop (``rfactor`` copies the
    loop nest from the block's outermost loop, so it runs before ``compute_at``).

    Only rows that are a whole number of chunks are factored: ``compute_at`` regenerates the
    copied loops without the predicate that would guard a partial last chunk (a softmax row
    of 197 would read past its end). The chunk is the widest ``k * width`` (``width`` halving
    from a full register down to 4 lanes) that divides the row; a row no such chunk divides
    (a prime length), a symbolic row, or a reduction ``rfactor`` cannot factor keeps the
    unrolled scalar chain.
    """
    kinds = info.dom_kind()
    if ACCUMULATORS < 1 or not kinds.endswith("R") or kinds.count("R") != 1:
        return []
    block = info.block_rv
    loops = sch.get_loops(block)
    n = extent(sch, loops[-1])
    chunk = _chunk(n, lanes)
    if chunk is None:
        return []
    k, width = chunk
    try:
        _, inner = sch.split(loops[-1], factors=[None, k * width])
        parts = [_Partials(sch.rfactor(inner, factor_axis=0), k * width)]
        if k > 1:
            _, lane = sch.split(sch.get_loops(block)[-1], factors=[k, width])
            parts.append(_Partials(sch.rfactor(lane, factor_axis=0), width))
    except Exception as exc:  # noqa: BLE001 - ScheduleError: keep the scalar chain
        log.debug("row reduction %s not factored: %s", sch.get(block).name_hint, exc)
        return []
    return parts


def _chunk(n: int | None, lanes: int) -> tuple[int, int] | None:
    """``(accumulators, vector width)`` for a row of ``n``: the widest chunk dividing it with
    at least two chunks per row (None: keep the scalar chain)."""
    if n is None:
        return None
    best = None
    width = lanes
    while width >= 4:
        for k in (4, 2, 1):
            if k > ACCUMULATORS:
                continue
            if n % (k * width) == 0 and n >= 2 * k * width and (
                    best is None or k * width > best[0] * best[1]):
                best = (k, width)
        width //= 2
    return best


def _vector_partials(sch: s_tir.Schedule, part: _Partials, rows):
    """Compute the ``rfactor`` block ``part`` under the row loop ``rows``, its lanes innermost
    and vectorized. Returns its outer reduction loop, where the caller splits the zeroing off
    (``decompose_reduction``) once every block is placed and the rows are parallel: a block
    without its init is neither complete nor a reduction, and ``compute_at`` of a producer or
    ``parallel`` would refuse it."""
    sch.compute_at(part.block, rows, preserve_unit_loops=True)
    row = sch.get(rows)
    loops = sch.get_loops(part.block)
    depth = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(row))
    realize = _realize(sch, part.block)
    lane_var = realize.iter_values[0]  # factor_axis=0: the partial-result buffer's lane axis
    reduce_vars = set()
    for iv, value in zip(realize.block.iter_vars, realize.iter_values, strict=True):
        if iv.iter_type != tirx.IterVar.DataPar:
            reduce_vars |= {v.name for v in vars_in([value])}
    spatial, reduce, lane = [], [], None
    for lp in loops[depth + 1:]:
        var = sch.get(lp).loop_var
        if var.same_as(lane_var):
            lane = lp
        elif var.name in reduce_vars:
            reduce.append(lp)
        else:
            spatial.append(lp)
    if lane is None or not reduce:
        raise ValueError("rfactor block without a lane or a reduction loop")
    sch.reorder(*spatial, *reduce, lane)
    sch.vectorize(lane)
    return reduce[0]


def _realize(sch: s_tir.Schedule, block) -> s_tir.SBlockRealize:
    """The ``SBlockRealize`` of ``block`` (its iteration variables' loop bindings)."""
    target = sch.get(block)
    stack = [sch.mod["main"].body]
    while stack:
        node = stack.pop()
        if isinstance(node, s_tir.SBlockRealize):
            if node.block.same_as(target):
                return node
            stack.append(node.block.body)
        elif isinstance(node, tirx.SeqStmt):
            stack.extend(node.seq)
        elif isinstance(node, tirx.IfThenElse):
            stack.extend(n for n in (node.then_case, node.else_case) if n is not None)
        elif hasattr(node, "body"):
            stack.append(node.body)
    raise ValueError(f"block {target.name_hint} not found")
