"""Software prefetch of a matmul's next weight panel while the current one is in use.

The tiled matmul (:mod:`.cpu_matmul`) walks a packed weight ``[N / NR, K, NR]`` one panel at a
time and sweeps all row tiles over each panel. With few rows (CLIP ViT-B/32's 50 tokens)
a panel of a weight that is not in the caches comes from memory during its first row tile
only. Here the reduction loop of such a kernel also issues a prefetch of the same reduction
step's row of the *next* panel (``prefetcht1``: into L2, not L1, where the current panel's
tile works), so the next panel streams in while the current one is computed; the
prefetches that find the line already in L2 (all row tiles but the first) are cheap.

Measured on the Intel host (``benchmarks/weight_stream.py``, one thread, interleaved): the
50-row kernels are *not* bound by streaming their weights (cold weights, 320 MB cycled,
ran within 5% of warm ones, at 2.6-3.6 GB/s per core where a GEMV streams 9-18 GB/s), so
the prefetch is no bandwidth fix; it is used with the tall 10 x 16 tiles only, where it
measured 0.74-0.92x the time (with it LLVM addresses the activation rows without an index
register; see ``cpu_matmul.PANEL_PREFETCH``).

The rule marks the loop (:data:`PREFETCH_PANEL`, ``"<packed buffer name>|<panel axis>"``);
:func:`prefetch_next_panel` inserts the prefetches after scheduling, when the loop nest is
final.
"""

from __future__ import annotations

import tvm_ffi
from tvm import tirx

from .common import loaded_buffer

#: Loop annotation of a matmul's reduction loop: ``"<packed weight buffer>|<panel axis>"``.
PREFETCH_PANEL = "slimc.prefetch_panel"
#: Prefetch locality: 2 is ``prefetcht1`` on x86 (L2), ``prfm pldl2keep`` on aarch64.
LOCALITY = 2
#: Cache line bytes the prefetches step by.
LINE_BYTES = 64


def prefetch_next_panel(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with a prefetch of the next panel's row in every :data:`PREFETCH_PANEL` loop
    (the annotation is removed either way)."""

    def on_for(loop):
        spec = loop.annotations.get(PREFETCH_PANEL)
        if spec is None:
            return loop
        kept = {k: v for k, v in loop.annotations.items() if k != PREFETCH_PANEL}
        name, axis = str(spec).rsplit("|", 1)
        stmts = _prefetches(loop, name, int(axis))
        body = tirx.SeqStmt([*stmts, loop.body]) if stmts else loop.body
        return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, body,
                        loop.thread_binding, kept)

    return tvm_ffi.structural_map(func, [(tirx.For, on_for)])


def _substitute(expr, values: dict):
    """``expr`` with the variables in ``values`` replaced."""
    return tvm_ffi.structural_map(expr, [(tirx.Var, lambda var: values.get(var, var))])


def _prefetches(loop, name: str, axis: int) -> list:
    """Prefetch statements for the row of the next panel that ``loop``'s iteration reads."""
    from tvm.ir.expr import TensorLoad
    from tvm.s_tir import SBlockRealize
    from tvm.sym import Analyzer

    inner: list = []
    realizes: list = []

    def visit_for(node):
        inner.append((node.loop_var, node.min))
        return node

    def visit_realize(node):
        realizes.append(node)
        return node

    tvm_ffi.structural_map(loop.body, [(tirx.For, visit_for), (SBlockRealize, visit_realize)])
    for realize in realizes:
        loads: list = []

        def visit_load(node, loads=loads):
            buffer = loaded_buffer(node)
            if buffer is not None and buffer.name == name:
                loads.append(node)
            return node

        tvm_ffi.structural_map(realize.block.body, [(TensorLoad, visit_load)])
        if not loads:
            continue
        load = loads[0]
        buffer = loaded_buffer(load)
        bindings = {iv.var: value for iv, value in zip(realize.block.iter_vars,
                                                        realize.iter_values, strict=True)}
        zero = dict(inner)  # loops inside the reduction step: their first iteration
        analyzer = Analyzer()

        index = [analyzer.simplify(_substitute(_substitute(i, bindings), zero))
                 for i in load.indices]
        shape = buffer.shape
        if not all(isinstance(d, tirx.IntImm) for d in shape[axis:]):
            return []
        last = int(shape[axis]) - 1
        index[axis] = tirx.Min(index[axis] + tirx.const(1, index[axis].ty),
                               tirx.const(last, index[axis].ty))
        per_line = max(1, LINE_BYTES // (buffer.dtype.bits // 8))
        width = int(shape[-1])
        stmts = []
        for start in range(0, width, per_line):
            at = [*index[:-1], tirx.const(start, index[-1].ty)]
            address = tirx.address_of(tirx.BufferLoad(buffer, at))
            # LLVM's intrinsic directly: TVM 0.27's ``tirx.prefetch`` (an int32 call) finds no
            # matching declaration of the void ``llvm.prefetch`` and fails the build
            stmts.append(tirx.Evaluate(tirx.call_llvm_intrin(
                "void", "llvm.prefetch", address,
                *(tirx.const(v, "int32") for v in (0, LOCALITY, 1)))))
        return stmts
    return []
