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
* rows whose kept intermediate would not fit on the stack (long or symbolic-length softmax
  rows) are computed a few at a time, sharing one scratch allocation (``_rows_per_chunk``).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from . import common
from .common import (
    extent,
    inline_spatial,
    intermediate_buffers,
    is_spatial,
    vector_lanes,
)


class RowReduction:
    """Softmax / norm rule: one parallel row loop holding every block of the function."""

    name = "row-reduction"

    def apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        from tvm.s_tir.dlight.analysis import normalize_prim_func

        sch = s_tir.Schedule(func)
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
        if all(is_spatial(sch, b) for b in blocks):
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

        loops = sch.get_loops(last)
        chunk, lead = _rows_per_chunk(sch, loops[:leading], loops[leading:], infos)
        rows = sch.fuse(*lead) if leading > 1 else lead[0]
        rows = _row_loop(sch, rows, infos, leading)
        if rows is None:
            return None
        if chunk > 1:
            rows, _ = sch.split(rows, factors=[None, chunk])
        for info in reversed(infos[:-1]):
            sch.compute_at(info.block_rv, rows, preserve_unit_loops=True)
        # Split the last block only now: split first, a symbolic row length would give the
        # blocks computed at the row loop a rounded-up, clipped region (min/max predicates
        # that hide the tail from ``symbolic_tails``).
        _vectorize_inner(sch, last, lanes)
        for info in infos[:-1]:
            if info.is_injective():
                _vectorize_inner(sch, info.block_rv, lanes)
            else:
                _unroll_reduction(sch, info.block_rv, lanes)
        n_rows = extent(sch, rows)
        row_work = 1
        for loop in sch.get_loops(last)[1:]:
            row_work *= extent(sch, loop) or 64
        if n_rows is None or (n_rows > 1 and n_rows * row_work * len(infos)
                               >= common.MIN_PARALLEL_MEMORY_WORK):
            common.parallelize(sch, rows, common.MIN_PARALLEL_MEMORY_WORK)
        return sch


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


def _vectorize_inner(sch: s_tir.Schedule, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    if len(loops) <= 1:
        return
    n = extent(sch, loops[-1])
    if n is not None and n < 2:
        return
    if n is None or n > lanes:
        _, inner = sch.split(loops[-1], factors=[None, lanes])
        sch.vectorize(inner)
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
