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

from .common import MIN_PARALLEL_WORK, MIN_WORK_KEY, loaded_buffer


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

    scratch = _root_buffers(func)
    uses = _buffer_uses(func.body, scratch)
    added: list = []

    def on_for(loop):
        if loop.kind != tirx.ForKind.PARALLEL:
            return loop
        least = thresholds.get(loop.loop_var, min_work)
        work = _work(loop)
        if isinstance(work, tirx.IntImm) or _at_least(work, least):
            return loop  # decided when compiling (by the rule), or enough at any length
        inside = _buffer_uses(loop, scratch)
        private = {b: tirx.Var(f"{b.name}_serial", b.ty) for b, n in inside.items()
                   if n == uses.get(b)}
        added.extend(private.values())
        copy = fresh_copy(loop, buffers=private)
        serial = tirx.For(copy.loop_var, copy.min, copy.extent, tirx.ForKind.SERIAL, copy.body,
                          None, copy.annotations)
        return tirx.IfThenElse(work >= tirx.const(least, "int64"), loop, serial)

    func = tvm_ffi.structural_map(func, [(tirx.For, on_for)])
    return _allocate_in_root(func, added) if added else func


def _root_buffers(func: tirx.PrimFunc) -> list:
    """The scratch buffers the kernel allocates (in its root block)."""
    from tvm.s_tir import SBlockRealize

    body = func.body
    return list(body.block.alloc_buffers) if isinstance(body, SBlockRealize) else []


def _buffer_uses(stmt, buffers: list) -> dict:
    """How many loads and stores of each of ``buffers`` ``stmt`` contains.

    A scratch buffer used only inside one guarded loop nest gets its own copy in the serial
    nest (:func:`guard_parallel_loops`): shared by both nests, its allocation would be placed
    above the run-time test, at the kernel's root, where TVM can no longer shrink it to the
    part one iteration touches -- the 8 x 32 accumulator tile of a matmul became a buffer of
    symbolic size indexed through the whole output, which LLVM does not keep in registers
    (symbolic-length attention and softmax kernels 1.3-2x slower than their fixed twins).
    """
    from tvm.ir.expr import TensorLoad

    counts: dict = {}
    wanted = set(buffers)

    def count(node):
        buffer = loaded_buffer(node) if isinstance(node, TensorLoad) else node.buffer
        if buffer in wanted:
            counts[buffer] = counts.get(buffer, 0) + 1
        return node

    tvm_ffi.structural_map(stmt, [(TensorLoad, count), (tirx.BufferStore, count)])
    return counts


def _allocate_in_root(func: tirx.PrimFunc, buffers: list) -> tirx.PrimFunc:
    """``func`` with ``buffers`` added to its root block's allocations."""
    from tvm.s_tir import SBlock

    root = func.body.block

    def on_block(block):
        if not block.same_as(root):
            return block
        return SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, block.body,
                      block.init, [*block.alloc_buffers, *buffers], block.match_buffers,
                      block.annotations)

    return tvm_ffi.structural_map(func, [(SBlock, on_block)])


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


def fresh_copy(stmt, suffix: str = "_serial", buffers: dict | None = None):
    """``stmt`` with every variable it defines (loops, block iterators, lets) renamed (``suffix``
    appended), so that the copy can sit next to the original (TIR allows one definition per
    variable), and the buffers in ``buffers`` (old -> new) replaced."""
    from tvm_ffi.structural import DefRegionKind

    renamed: dict = dict(buffers or {})

    def rename(var, kind):
        if kind != DefRegionKind.NONE:
            renamed[var] = tirx.Var(f"{var.name}{suffix}", var.ty)
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
