"""Weight prepacking in numpy, one weight at a time.

After ``SplitLayoutRewritePreproc`` every packed weight is a call
``call_tir(<kernel>_weight_prepack, (W,))`` on a constant ``W``. TVM's ``FoldConstant``
evaluates such calls by compiling each prepack function with LLVM and running it in a VM,
allocating every result beside its source, plus the compiler's and the VM's own memory, in
the middle of the build of a real-size model (issue 18: compile peak memory).

A prepack function is a pure permutation of its input's elements: one block
``out[f(v)] = W[v]`` whose store indices are the iteration variables, or ``v // c`` and
``v % c`` of them (``cpu_matmul``'s ``[..., N] -> [N / NR, ..., NR]`` panels). Such a function
is the numpy ``reshape`` (each split axis into ``(dim / c, c)``) followed by a ``transpose``;
:func:`pack_constants` computes it that way, one weight at a time, each into one 64-byte
aligned buffer that TVM then shares (no copy). The sources go as it goes: the Relax functions
are taken out of the module and rewritten in rounds, each packing about an eighth of the
weights, and each round's rewrite replaces the function that held its sources, so at most that
share is resident twice (SmolLM2-135M ``-O0``: the whole packed set, 0.3 GB, was before).
Calls it cannot read as such a permutation (anything else a rule might emit) are left to the
``FoldConstant`` that follows.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .common import log

if TYPE_CHECKING:
    import tvm

@dataclass(frozen=True)
class Permutation:
    """``out = W.reshape(split).transpose(axes)``: what a prepack function computes."""

    split: tuple[int, ...]
    axes: tuple[int, ...]
    shape: tuple[int, ...]  # the output's

    def view(self, source: np.ndarray) -> np.ndarray:
        """``source`` in the packed layout, as a view (no copy yet)."""
        return source.reshape(self.split).transpose(self.axes)


def read_permutation(func: tvm.tirx.PrimFunc) -> Permutation | None:
    """The permutation ``func`` (a prepack function: one input, one output) computes, or None
    when it is anything else (then FoldConstant evaluates it as before)."""
    from tvm import tirx

    if len(func.params) != 2:
        return None
    src, dst = func.params  # TVM 0.27: a PrimFunc's parameters are its buffers
    if str(getattr(src, "dtype", "")) != str(getattr(dst, "dtype", "?")):
        return None
    in_shape = _static(src.shape)
    out_shape = _static(dst.shape)
    if in_shape is None or out_shape is None:
        return None
    root = getattr(func.body, "block", None)
    if root is None:
        return None
    stmt = root.body
    loops = []
    while isinstance(stmt, tirx.For):  # a copy's result does not depend on the loops' kinds
        loops.append(stmt)
        stmt = stmt.body
    realize = stmt
    block = getattr(realize, "block", None)
    if block is None or block.init is not None or block.alloc_buffers:
        return None
    store = block.body
    if not isinstance(store, tirx.BufferStore) or not store.buffer.same_as(dst):
        return None
    load = store.value
    source = getattr(load, "source", getattr(load, "buffer", None))
    if not hasattr(load, "indices") or source is None or not source.same_as(src):
        return None
    iters = [iv.var for iv in block.iter_vars]
    # The block reads W[v0, v1, ...] with each iteration variable over its whole axis, bound
    # to one loop each over the same extent: every element is visited exactly once.
    if len(iters) != len(in_shape) or len(load.indices) != len(in_shape):
        return None
    if not all(index.same_as(var) for index, var in zip(load.indices, iters, strict=True)):
        return None
    if len(loops) != len(iters) or not all(
            _int(iv.dom.min) == 0 and _int(iv.dom.extent) == dim
            for iv, dim in zip(block.iter_vars, in_shape, strict=True)):
        return None
    if not all(value.same_as(loop.loop_var) and _int(loop.min) == 0
               and _int(loop.extent) == dim
               for value, loop, dim in zip(realize.iter_values, loops, in_shape, strict=True)):
        return None
    return _permutation(store.indices, iters, in_shape, out_shape)


def _permutation(indices, iters, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...]) -> Permutation | None:
    """Read each store index as a whole input axis, ``v // c`` or ``v % c`` of one."""
    from tvm import tirx

    position = {var: i for i, var in enumerate(iters)}
    forms: list[tuple[int, str, int]] = []
    for index in indices:
        if isinstance(index, tirx.Var) and index in position:
            forms.append((position[index], "whole", 0))
            continue
        kind = {tirx.FloorDiv: "div", tirx.FloorMod: "mod"}.get(type(index))
        if kind is None or not isinstance(index.a, tirx.Var) or index.a not in position:
            return None
        factor = _int(index.b)
        if factor is None or factor <= 0:
            return None
        forms.append((position[index.a], kind, factor))
    # Each input axis appears whole once, or as both halves of one split by a factor that
    # divides it; that makes the index map a bijection, i.e. a reshape + transpose.
    split: list[int] = []
    sub: dict[tuple[int, str], int] = {}
    for axis, dim in enumerate(in_shape):
        used = [(kind, c) for a, kind, c in forms if a == axis]
        if used == [("whole", 0)]:
            sub[(axis, "whole")] = len(split)
            split.append(dim)
        elif sorted(k for k, _ in used) == ["div", "mod"] and used[0][1] == used[1][1] \
                and dim % used[0][1] == 0:
            c = used[0][1]
            sub[(axis, "div")] = len(split)
            sub[(axis, "mod")] = len(split) + 1
            split += [dim // c, c]
        else:
            return None
    axes = tuple(sub[(axis, kind)] for axis, kind, _ in forms)
    if tuple(split[a] for a in axes) != out_shape:
        return None
    return Permutation(tuple(split), axes, out_shape)


def _int(expr) -> int | None:
    value = getattr(expr, "value", None)
    return int(value) if isinstance(value, int) else None


def _static(shape) -> tuple[int, ...] | None:
    dims = [_int(d) for d in shape]
    return None if any(d is None for d in dims) else tuple(dims)  # type: ignore[misc]


def pack_constants(mod: tvm.IRModule, prepack: set) -> tvm.IRModule:
    """``mod`` with every ``call_tir(f, (constant,))`` of a prepack function ``f`` (a
    :class:`~tvm.ir.GlobalVar` in ``prepack``) replaced by the packed constant, computed in
    numpy one weight at a time (see the module docstring)."""
    import tvm
    from tvm import relax

    from .constant_views import _constant, _constant_value

    plans = {}
    for gvar in prepack:
        func = mod[gvar]
        plan = read_permutation(func) if isinstance(func, tvm.tirx.PrimFunc) else None
        if plan is None:
            log.debug("prepack: %s is not a permutation; FoldConstant evaluates it",
                      gvar.name_hint)
        else:
            plans[gvar] = plan
    if not plans:
        return mod

    packed: dict[tuple, relax.Expr] = {}  # (data address, function) -> packed constant
    call_tir = tvm.ir.Op.get("relax.call_tir")
    budget = [0]  # bytes this round may still pack
    replaced = [0]

    @relax.expr_functor.mutator
    class Packer(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: N802 - TVM's visitor name
            call = super().visit_call_(call)
            if not call.op.same_as(call_tir) or call.args[0] not in plans:
                return call
            args = call.args[1].fields
            if len(args) != 1 or not isinstance(args[0], tvm.ir.expr.Constant) \
                    or not hasattr(args[0].value, "shape"):
                return call
            plan = plans[call.args[0]]
            try:
                source = _constant_value(args[0])
                if source is None:
                    return call
                key = (source.ctypes.data, call.args[0])
                if key not in packed:
                    if budget[0] <= 0:
                        return call  # the next round packs it
                    budget[0] -= source.nbytes
                    # one copy, into the aligned buffer the new constant shares
                    packed[key] = _constant(plan.view(source))
                del source
            except (TypeError, ValueError, BufferError, RuntimeError) as exc:
                # a dtype numpy cannot hold (bfloat16, sub-byte): TVM evaluates this one
                log.debug("prepack: %s left to FoldConstant: %s", call.args[0].name_hint, exc)
                return call
            replaced[0] += 1
            return packed[key]

    # The Relax functions leave the module: from here on they are the only holders of the
    # sources (the caller emptied the module it gave the split), so replacing a function by
    # its rewrite frees the sources that rewrite packed. Packing a share of the weights per
    # round bounds what is resident twice to that share, for one more walk of the function.
    functions = [(gvar, func) for gvar, func in mod.functions_items()
                 if isinstance(func, relax.Function)]
    for gvar in [g for g, _ in functions]:  # (a loop variable bound to a function would
        del mod[gvar]                          # keep its weights alive to the end)
    share = max(_packable_bytes(functions, plans) // PACK_ROUNDS, MIN_ROUND_BYTES)
    while True:
        budget[0], replaced[0] = share, 0
        functions = [(gvar, Packer(mod).visit_expr(func)) for gvar, func in functions]
        gc.collect()  # whatever cycle still holds an old function (a mutator's) goes now
        if not replaced[0]:
            break
    for gvar, func in functions:
        mod[gvar] = func
    return mod


#: Rounds the packing is split into (each walks the Relax functions once more).
PACK_ROUNDS = 8
#: Least bytes a round packs (small models: one round).
MIN_ROUND_BYTES = 32 << 20


def _packable_bytes(functions, plans) -> int:
    from tvm import relax

    total = [0]

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir" \
                and expr.args[0] in plans:
            for arg in expr.args[1].fields:
                value = getattr(arg, "value", None)
                if hasattr(value, "shape"):
                    total[0] += int(np.prod([int(d) for d in value.shape])) \
                        * ((value.dtype.bits * value.dtype.lanes + 7) // 8)

    for _, func in functions:
        relax.analysis.post_order_visit(func, visit)
    return total[0]
