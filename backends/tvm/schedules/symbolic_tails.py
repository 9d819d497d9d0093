"""Peel the tail off loops whose trip count is symbolic (dynamic sequence length).

A loop over a symbolic extent ``n`` is split into whole vector (or unroll) chunks and a
predicate ``i_outer * 16 + i_inner < n`` on the block. Left as is, that predicate sits in every
iteration: LLVM cannot emit the vectorized body unmasked, so TVM scalarizes it, and the unrolled
reduction steps each carry a compare and branch. Measured on MiniLM at a dynamic length of 64,
the softmax and the attention-mask add ran 4-5x slower than their fixed-length versions.

:func:`peel_symbolic_tails` marks every serial loop that drives such a predicate with TVM's
``pragma_loop_partition_hint``; ``LoopPartition`` (which runs before ``VectorizeLoop`` when
the kernel is lowered) then splits it into a predicate-free main loop over the whole chunks and
a short tail loop, which is what a fixed-length kernel gets when its length is a multiple of
the chunk. Only predicates that mention a symbolic variable are considered: fixed-length
kernels are left exactly as the rules scheduled them.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from .common import vars_in

#: The loop annotation ``LoopPartition`` reads (its ``partition_const_loop`` option only
#: covers loops of constant extent).
PARTITION_HINT = "pragma_loop_partition_hint"


def peel_symbolic_tails(sch: s_tir.Schedule) -> int:
    """Annotate the loops of ``sch`` whose symbolic-extent predicate should be peeled off.

    Returns the number of loops annotated (0: nothing symbolic, the schedule is unchanged).
    """
    marked = 0
    seen: set = set()
    for block in _all_blocks(sch):
        loops = sch.get_loops(block)
        if not loops:
            continue
        predicate = _predicate(sch, block, loops[-1])
        if predicate is None:
            continue
        used = vars_in(predicate)
        loop_vars = {sch.get(lp).loop_var for lp in loops}
        if not any(v not in loop_vars for v in used):
            continue  # a fixed-length tail: left as the rule scheduled it
        for loop in loops:
            stmt = sch.get(loop)
            if stmt.loop_var not in used or stmt.kind != tirx.ForKind.SERIAL:
                continue
            if isinstance(stmt.extent, tirx.IntImm) or PARTITION_HINT in stmt.annotations:
                continue  # the chunk inside a split (constant), or marked already
            if stmt.loop_var in seen:
                continue
            seen.add(stmt.loop_var)
            sch.annotate(loop, ann_key=PARTITION_HINT, ann_val=1)
            marked += 1
    return marked


def _all_blocks(sch: s_tir.Schedule) -> list:
    """Every block of the function, nested ones (blockized tiles) included."""
    todo = list(sch.get_child_blocks(sch.get_sblock("root")))
    blocks = []
    while todo:
        block = todo.pop()
        blocks.append(block)
        todo.extend(sch.get_child_blocks(block))
    return blocks


def _predicate(sch: s_tir.Schedule, block, loop):
    """The non-trivial ``T.where`` of ``block`` (directly under ``loop``), else None."""
    from tvm.s_tir import SBlockRealize

    target = sch.get(block)
    body = sch.get(loop).body
    candidates = list(body.seq) if isinstance(body, tirx.SeqStmt) else [body]
    for stmt in candidates:
        if isinstance(stmt, SBlockRealize) and stmt.block.same_as(target):
            predicate = stmt.predicate
            if isinstance(predicate, tirx.IntImm) and predicate.value:
                return None
            return predicate
    return None
