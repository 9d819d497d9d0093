"""Run the whole tiles of a symbolic-length matmul without bounds checks.

A matmul over a dynamic length pads its tile axes (``pad_einsum``, see
:func:`.cpu_matmul._pad_symbolic_tiles`), and every tile then carries the checks only the edge
tiles need: the write-back ``row < seq and col < seq`` on each stored vector (a condition on
the vector lane scalarizes the store: the 8 x 16 tiles of MiniLM's attention scores were
written one float at a time), the clamped row index ``X[min(row, seq - 1), k]``, and, for a
symbolic *vector* axis (the key axis of the attention scores), a zero-padded copy of that
operand (``K^T``) made on every call. At 256 tokens the dynamic attention-score and context
kernels together took 2x the time of their fixed-length versions.

:func:`split_whole_tiles` keeps two versions of the body of the tile loop the rule marked
(:data:`WHOLE_TILES`): ``if <the tile lies inside the bounds>: <body without checks> else:
<body as scheduled>``. The test is each check evaluated at the tile's last row and column:
every check is ``a < b`` with ``a`` linear, with non-negative coefficients, in the tile's
loops (of constant extent) and ``b`` free of them, so the last corner is the worst case. A
check that does not have that form leaves the kernel as it was. Only the edge tiles (at most
one row and one column of tiles) run the guarded version, which is why the symbolic vector
operand can be read in place too (its clamped column index is a gather, in edge tiles only).
"""

from __future__ import annotations

import tvm_ffi
from tvm import s_tir, tirx

from .common import loaded_buffer, vars_in
from .parallel_guard import fresh_copy

#: Loop annotation (set by the tiled-matmul rule on its fused tile loop): split the loop's body
#: into a whole-tile and an edge-tile version.
WHOLE_TILES = "slimc.whole_tiles"
#: Block annotation of blocks whose guarded reads ``if_then_else(i < n, X[.., i, ..], 0)`` read
#: rows or columns that only feed outputs never stored (set by the tiled-matmul rule).
CLAMP_PADDED_ROWS = "slimc.clamp_padded_rows"
#: Block annotation of blocks that read zero padding inline, ``if_then_else(<inside the
#: image>, X[..], 0)`` (a depthwise conv, set by the tiled-matmul rule): tiles whose every tap
#: lies inside the image read ``X`` unguarded.
PADDED_READS = "slimc.padded_reads"


def split_whole_tiles(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with the body of every :data:`WHOLE_TILES` loop split (see module docstring);
    the annotation is removed either way."""

    def on_for(loop):
        if WHOLE_TILES not in loop.annotations:
            return loop
        kept = {k: v for k, v in loop.annotations.items() if k != WHOLE_TILES}
        body = _split(loop.body)
        return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind,
                        loop.body if body is None else body, loop.thread_binding, kept)

    return tvm_ffi.structural_map(func, [(tirx.For, on_for)])


def is_guarded_read(call, clamped: bool = True):
    """``(row, bound, load)`` of ``if_then_else(row < bound, X[.., row, ..], 0)``, else None."""
    if getattr(call.op, "name", "") != "prim.if_then_else":
        return None
    cond, then = call.args[0], call.args[1]
    if not isinstance(cond, tirx.LT) or loaded_buffer(then) is None \
            or not isinstance(cond.a, tirx.Var):
        return None
    if not any(isinstance(i, tirx.Var) and i.same_as(cond.a) for i in then.indices):
        return None
    return cond.a, cond.b, then


def padded_read(expr):
    """``(inside, load)`` of ``if_then_else(inside, X[..], 0)``, else None."""
    if getattr(getattr(expr, "op", None), "name", "") != "prim.if_then_else":
        return None
    cond, then, other = expr.args
    zero = isinstance(other, tirx.FloatImm | tirx.IntImm) and other.value == 0
    return (cond, then) if zero and loaded_buffer(then) is not None else None


def _split(body):
    """``if whole_tile: <body without checks> else: <body>``, or None when a check is not of
    the form the corner test covers."""
    from tvm.ir.expr import Call

    extents: dict = {}  # loops inside the tile: var -> (min, extent)
    checks: list = []  # conditions every tile must meet to drop the checks

    def on_loop(loop):
        extents[loop.loop_var] = (loop.min, loop.extent)
        return loop

    def on_realize(realize):
        if not (isinstance(realize.predicate, tirx.IntImm) and realize.predicate.value):
            checks.append(realize.predicate)
        block = realize.block
        clamped, padded = CLAMP_PADDED_ROWS in block.annotations, PADDED_READS in block.annotations
        if clamped or padded:
            binding = {iv.var: value for iv, value in
                       zip(block.iter_vars, realize.iter_values, strict=True)}
            rows: list = []  # guarded row reads: row < bound
            windows: list = []  # padded reads: the inside-the-image condition

            def on_call(call):
                guarded = is_guarded_read(call) if clamped else None
                if guarded is not None:
                    row, bound, _ = guarded
                    rows.append(tirx.LT(binding.get(row, row), bound))
                inside = padded_read(call) if padded else None
                if inside is not None:
                    windows.append(tvm_ffi.structural_map(
                        inside[0], [(tirx.Var, lambda v: binding.get(v, v))]))
                return call

            tvm_ffi.structural_map(block.body, [(Call, on_call)])
            checks.extend(rows + windows)
        return realize

    tvm_ffi.structural_map(body, [(tirx.For, on_loop), (s_tir.SBlockRealize, on_realize)])
    if not checks:
        return None
    corners = []
    for check in checks:
        for part in _conjuncts(check):
            corner = _at_last_corner(part, extents)
            if corner is None:
                return None
            corners.append(corner)
    whole = corners[0]
    for corner in corners[1:]:
        whole = tirx.And(whole, corner)
    return tirx.IfThenElse(whole, _unchecked(body), fresh_copy(body, "_edge"))


def _conjuncts(expr) -> list:
    if isinstance(expr, tirx.And):
        return _conjuncts(expr.a) + _conjuncts(expr.b)
    return [expr]


def _at_last_corner(check, extents: dict):
    """``check`` at the tile's worst corner, when there is one: ``a < b`` or ``a <= b`` with
    ``a`` growing with each of the tile's loops and ``b`` free of them, at their last
    iteration; or ``b`` growing and ``a`` free (a lower bound: the top / left zero padding
    of a conv), at their first. Else None."""
    from tvm.sym import Analyzer

    if isinstance(check, tirx.GT | tirx.GE):
        check = (tirx.LT if isinstance(check, tirx.GT) else tirx.LE)(check.b, check.a)
    if not isinstance(check, tirx.LT | tirx.LE):
        return None
    in_a = [v for v in vars_in(check.a) if v in extents]
    in_b = [v for v in vars_in(check.b) if v in extents]
    if in_a and in_b:
        return None
    if not in_a and not in_b:
        return check
    a, b = check.a, check.b
    if in_a:
        a = _at_corner(a, in_a, extents, last=True)
    else:
        b = _at_corner(b, in_b, extents, last=False)
    if a is None or b is None:
        return None
    return type(check)(Analyzer().simplify(a), Analyzer().simplify(b))


def _at_corner(expr, inner: list, extents: dict, last: bool):
    """``expr`` with the loops ``inner`` at their last (first) iteration, when it grows with
    each of them (non-negative constant coefficients), else None."""
    from tvm.sym import detect_linear_equation

    coefficients = detect_linear_equation(expr, inner)
    if len(coefficients) != len(inner) + 1:
        return None
    corner = {}
    for var, coefficient in zip(inner, coefficients[:-1], strict=False):
        lo, extent = extents[var]
        if not (isinstance(coefficient, tirx.IntImm) and coefficient.value >= 0
                and isinstance(extent, tirx.IntImm) and isinstance(lo, tirx.IntImm)):
            return None
        corner[var] = tirx.const(lo.value + (extent.value - 1 if last else 0), extent.ty)
    return tvm_ffi.structural_map(expr, [(tirx.Var, lambda v: corner.get(v, v))])


def _unchecked(body):
    """``body`` without block predicates and with guarded reads of marked blocks unguarded."""
    from tvm.ir.expr import Call

    def on_realize(realize):
        return s_tir.SBlockRealize(realize.iter_values, tirx.const(True, "bool"), realize.block)

    def on_block(block):
        clamped = CLAMP_PADDED_ROWS in block.annotations
        padded = PADDED_READS in block.annotations
        if not clamped and not padded:
            return block

        def on_call(call):
            guarded = is_guarded_read(call) if clamped else None
            if guarded is not None:
                return guarded[2]
            inside = padded_read(call) if padded else None
            return call if inside is None else inside[1]

        return tvm_ffi.structural_map(block, [(Call, on_call)])

    return tvm_ffi.structural_map(body, [(s_tir.SBlockRealize, on_realize),
                                         (s_tir.SBlock, on_block)])
