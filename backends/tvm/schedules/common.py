"""Helpers shared by the CPU schedule rules: vector width, loop extents, safe inlining.

Every rule works on a fresh ``s_tir.Schedule`` and either returns it fully scheduled or returns
``None``; nothing here mutates a schedule it was not asked to.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.target import Target

from slimc import interrupts

log = logging.getLogger("slimc.schedules")

#: Loops with fewer iterations than this (times their body) are not worth a parallel launch:
#: the thread pool's wake-up costs more than the work.
MIN_PARALLEL_WORK = 4096
#: Memory-bound kernels (elementwise, transposes, norms, softmax) stay on one thread below this
#: many element-steps. A parallel launch returns only when *every* worker has run its share --
#: TVM's pool cannot take back the share of a worker the OS has not scheduled yet -- so on a
#: loaded host each launch can wait a whole scheduler time slice, and a transformer layer has
#: a dozen such kernels of ~1e5 elements that take tens of microseconds on one core (ViT-Small:
#: 197 x 384 residual adds and norms). ONNX Runtime runs those ops on the calling thread too.
MIN_PARALLEL_MEMORY_WORK = 1 << 18
#: Loop annotation left by :func:`parallelize`: the least work (scalar iterations of the loop
#: nest) for which the rule wants the loop parallel. With a symbolic extent the rule cannot
#: decide when compiling; :mod:`.parallel_guard` turns it into a run-time test and removes it.
MIN_WORK_KEY = "slimc_min_parallel_work"
#: TVM's ``kMaxStackAlloca``: a CPU buffer in ``"global"`` scope of constant size below this
#: many bytes is a stack ``alloca``; any other (a ``"local"`` one of any size, a larger one) is
#: taken from ``TVMBackendAllocWorkspace`` and freed again where it is declared.
STACK_ALLOCA_BYTES = 1024


def tile_buffer_scope(nbytes: int | None) -> str:
    """Storage scope for a per-tile scratch buffer (a micro-kernel's accumulators) of
    ``nbytes``: ``"global"`` when that puts it on the stack, else ``"local"``.

    Why: TVM's ``LowerTVMBuiltin`` keeps only *global*-scope CPU buffers under
    :data:`STACK_ALLOCA_BYTES` on the stack; a ``"local"`` accumulator tile declared inside
    the parallel tile loop costs a workspace allocation and a free per tile, and LLVM then
    also keeps the dead stores to it. For a depthwise conv (9 or 25 multiply-adds per output
    vector) that is a fifth of the kernel's time (a 3 x 3 over 56 x 56 x 144: 0.54 -> 0.43
    ms on one thread). On the stack the whole tile is promoted to registers.
    """
    return "global" if nbytes is not None and 0 < nbytes < STACK_ALLOCA_BYTES else "local"


def vector_bits(target: Target) -> int:
    """SIMD register width in bits: 512 with AVX-512, 256 with AVX2, 128 for NEON/SSE.

    Resolved from the CPU's features (:func:`slimc.isa.simd_width_bits`), not TVM's
    ``llvm_get_vector_width``, which says 512 for an AVX2-only host.
    """
    from slimc.isa import simd_width_bits

    return simd_width_bits(target)


def vector_lanes(target: Target, dtype_bits: int = 32) -> int:
    """Elements of ``dtype_bits`` that fit one SIMD register of ``target``."""
    return max(vector_bits(target) // max(dtype_bits, 8), 2)


def simd_registers(target: Target) -> int:
    """Architectural SIMD registers: 32 on AVX-512 and aarch64, 16 on AVX2/SSE."""
    mtriple = str(target.attrs.get("mtriple", ""))
    if mtriple.startswith(("aarch64", "arm64")):
        return 32
    return 32 if vector_bits(target) >= 512 else 16


def extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int | None:
    """Constant trip count of ``loop``, or None for a symbolic one."""
    value = sch.get(loop).extent
    return int(value.value) if isinstance(value, tirx.IntImm) else None


def static_dims(shape) -> list[int] | None:
    """The dims of a Relax/TIR ``shape`` as ints, or None when any is symbolic."""
    try:
        return [int(d) for d in shape]
    except (TypeError, ValueError):
        return None


def parallelize(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV, min_work: int) -> None:
    """Make ``loop`` parallel, recording the rule's threshold ``min_work`` on it.

    A rule compares its work estimate with ``min_work`` when the extents are constants; when
    one is symbolic (a dynamic sequence length) the loop is made parallel here and
    :func:`.parallel_guard.guard_parallel_loops` keeps a serial copy for the calls whose actual
    work is below the *same* threshold, so a short input runs exactly the launches a
    fixed-length kernel of that length would (a layer norm of 16 tokens stays on one thread).
    """
    sch.parallel(loop)
    sch.annotate(loop, ann_key=MIN_WORK_KEY, ann_val=int(min_work))


def intermediate_buffers(sch: s_tir.Schedule) -> set:
    """Buffers allocated inside the function (everything else it writes is an output)."""
    return set(sch.get(sch.get_sblock("root")).alloc_buffers)


def block_writes_output(sch: s_tir.Schedule, block, intermediates: set) -> bool:
    """Whether ``block`` writes a buffer the caller sees (such a block cannot be inlined)."""
    return any(w.source not in intermediates for w in sch.get(block).writes)


def loaded_buffer(node):
    """The buffer a load expression reads, or None if ``node`` is not a load.

    TVM 0.27's TIR calls the node ``TensorLoad`` (field ``source``); older ones ``BufferLoad``.
    """
    if type(node).__name__ not in ("TensorLoad", "BufferLoad"):
        return None
    source = getattr(node, "source", None)
    return source if source is not None else getattr(node, "buffer", None)


def is_spatial(sch: s_tir.Schedule, block) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def inline_spatial(sch: s_tir.Schedule, blocks: list, intermediates: set,
                   keep_reduction_inputs: bool = False) -> list:
    """Inline every spatial block that writes an intermediate buffer; return what remains.

    Inlining removes intermediate buffers (one pass over memory instead of several); a block that
    cannot be inlined simply stays. With ``keep_reduction_inputs`` a block feeding a reduction
    stays too: inlined there, an expensive producer (softmax's ``exp``) would be recomputed by
    the reduction *and* by its other consumers, in scalar code.
    """
    remaining = list(blocks)
    changed = True
    while changed:
        changed = False
        for block in list(remaining):
            if not is_spatial(sch, block) or block_writes_output(sch, block, intermediates):
                continue
            if keep_reduction_inputs and any(
                    not is_spatial(sch, c) for c in sch.get_consumers(block)):
                continue
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001 - ScheduleError: keep the block
                interrupts.check()  # a swallowed Ctrl-C/SIGTERM stops here
                continue
            remaining.remove(block)
            changed = True
    return remaining


def pick_tile(total: int | None, preferred: list[int]) -> int:
    """The first of ``preferred`` that divides ``total`` (no tail), else the first one."""
    if total is None:
        return preferred[0]
    for size in preferred:
        if size <= total and total % size == 0:
            return size
    return min(preferred[0], total)


def realize_bindings(sch: s_tir.Schedule, loops) -> list | None:
    """Iterator bindings of the block directly under the innermost of ``loops``."""
    from tvm.s_tir import SBlockRealize

    body = sch.get(loops[-1]).body
    return list(body.iter_values) if isinstance(body, SBlockRealize) else None


def vars_in(exprs) -> set:
    """The free variables of an expression (or a list of them)."""
    from tvm.tirx.analysis import undefined_vars

    if not isinstance(exprs, list):
        exprs = [exprs]
    return {v for e in exprs for v in undefined_vars(e)}


def mutate_relax_functions(mod, mutator):
    """Run a ``PyExprMutator`` over every Relax function of ``mod``; the rewritten module."""
    from tvm import relax

    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return mutator.builder_.get()


def permuted_constant(mutator, expr):
    """``(W, axes)`` if ``expr`` is a constant ``W`` or ``permute_dims(W, axes)`` of one.

    Looks through dataflow bindings (``mutator`` is the ``PyExprMutator`` visiting the
    function). ``axes`` is None when there is no ``permute_dims``; a ``permute_dims`` without
    axes reverses them. Relax passes that lay weights out at build time (panel GEMV, Winograd
    filters) find the weight this way under the transposes the importer and ConvertLayout add.
    """
    import tvm
    from tvm import relax

    def bound(e):
        if isinstance(e, relax.Var):
            value = mutator.lookup_binding(e)
            return value if value is not None else e
        return e

    expr, axes = bound(expr), None
    if isinstance(expr, relax.Call) and getattr(expr.op, "name", None) == "relax.permute_dims":
        source = bound(expr.args[0])
        if not isinstance(source, tvm.ir.expr.Constant):
            return None
        given = expr.attrs.axes
        rank = len(source.value.shape)
        axes = [int(a) for a in given] if given is not None else list(range(rank))[::-1]
        expr = source
    return (expr, axes) if isinstance(expr, tvm.ir.expr.Constant) else None
