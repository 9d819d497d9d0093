"""Decide at run time whether a symbolic-length loop nest is worth the thread pool.

The rules parallelize a loop only when its iterations times its body make enough work: waking
the pool for a few thousand operations costs more than they do, and on a loaded machine a
parallel launch waits for a descheduled worker. Each rule has its own threshold (memory-bound
norms, softmax, elementwise and transposes :data:`~.common.MIN_PARALLEL_MEMORY_WORK`, matmuls
``MATMUL_PARALLEL_WORK``), which it records on the loop (:func:`~.common.parallelize`). With a
symbolic extent (a dynamic sequence length) the work is unknown when compiling, so the rules
parallelize, and a dynamic artifact called with 16 tokens made ~190 parallel launches where the
16-token fixed-length one made ~100.

:func:`guard_parallel_loops` keeps both versions of each such loop nest under a run-time test
of the rule's threshold: ``if work >= min_work: <parallel loop> else: <serial loop>``. The two
copies are the same scheduled code, only the outer loop's kind differs. (Until the threshold
was taken from the rule, every guard used the smallest one, :data:`~.common.MIN_PARALLEL_WORK`:
at 16 tokens MiniLM's layer norms, residual adds, GELUs and transposes ran parallel in the
dynamic artifact and serially in the fixed one.)
"""

from __future__ import annotations

import tvm_ffi
from tvm import tirx

from .common import MIN_PARALLEL_WORK, MIN_WORK_KEY


def guard_parallel_loops(func: tirx.PrimFunc, min_work: int = MIN_PARALLEL_WORK) -> tirx.PrimFunc:
    """``func`` with each parallel loop of non-constant total work behind a run-time test.

    The threshold is the one the rule recorded on the loop (:data:`~.common.MIN_WORK_KEY`,
    removed here), else ``min_work``. Reshapes are left alone: Relax turns them into views of
    their input (no kernel at all) only while they keep the single loop nest
    ``RewriteDataflowReshape`` recognises.
    """
    from tvm.relax.analysis import has_reshape_pattern

    thresholds: dict = {}

    def unmark(loop):
        if MIN_WORK_KEY not in loop.annotations:
            return loop
        kept = {k: v for k, v in loop.annotations.items() if k != MIN_WORK_KEY}
        bare = tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, loop.body,
                        loop.thread_binding, kept)
        thresholds[loop.loop_var] = int(loop.annotations[MIN_WORK_KEY])
        return bare

    func = tvm_ffi.structural_map(func, [(tirx.For, unmark)])
    if has_reshape_pattern(func):
        return func

    def on_for(loop):
        if loop.kind != tirx.ForKind.PARALLEL:
            return loop
        least = thresholds.get(loop.loop_var, min_work)
        work = _work(loop)
        if isinstance(work, tirx.IntImm) or _at_least(work, least):
            return loop  # decided when compiling (by the rule), or enough at any length
        copy = _fresh_copy(loop)
        serial = tirx.For(copy.loop_var, copy.min, copy.extent, tirx.ForKind.SERIAL, copy.body,
                          None, copy.annotations)
        return tirx.IfThenElse(work >= tirx.const(least, "int64"), loop, serial)

    return tvm_ffi.structural_map(func, [(tirx.For, on_for)])


def _at_least(work, min_work: int) -> bool:
    """Whether ``work`` reaches ``min_work`` even when every symbol is 1 (its least value:
    a dynamic dimension's lower bound is at least 1), i.e. the guard would always pick the
    parallel loop. The serial copy would then be dead code, and TVM's simplifier, which
    derives ``seq == 0`` from it, divides by zero while lowering it."""
    from tvm.sym import Analyzer

    least = tvm_ffi.structural_map(
        work, [(tirx.Var, lambda v: tirx.const(1, "int64"))])
    least = Analyzer().simplify(least)
    return isinstance(least, tirx.IntImm) and least.value >= min_work


def _fresh_copy(stmt):
    """``stmt`` with every variable it defines (loops, block iterators, lets) renamed, so that
    the copy can sit next to the original (TIR allows one definition per variable)."""
    from tvm_ffi.structural import DefRegionKind

    renamed: dict = {}

    def rename(var, kind):
        if kind != DefRegionKind.NONE:
            renamed[var] = tirx.Var(f"{var.name}_serial", var.ty)
            return renamed[var]
        return renamed.get(var, var)

    return tvm_ffi.structural_map(stmt, with_def_region_kind=[(tirx.Var, rename)])


def _work(stmt):
    """Scalar iterations of the loop nest ``stmt`` (a sum over sequences, products of extents)."""
    from tvm.sym import Analyzer

    return Analyzer().simplify(_count(stmt))


def _count(stmt):
    if isinstance(stmt, tirx.For):
        return tirx.Cast("int64", stmt.extent) * _count(stmt.body)
    if isinstance(stmt, tirx.SeqStmt):
        total = None
        for child in stmt.seq:
            part = _count(child)
            total = part if total is None else total + part
        return total if total is not None else tirx.const(1, "int64")
    if isinstance(stmt, tirx.IfThenElse):
        return _count(stmt.then_case)
    for field in ("block", "body"):  # block realizes, blocks, allocations, attributes, lets
        child = getattr(stmt, field, None)
        if isinstance(child, tirx.Stmt):
            return _count(child)
    return tirx.const(1, "int64")
