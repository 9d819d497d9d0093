"""A tied embedding stored once: the lookup reads the output head's transposed weight.

Why: with ``tie_word_embeddings`` (SmolLM2, Llama 3.2, Gemma, ...) one matrix ``E [V, H]`` is
both the token embedding (``take(E, ids)``) and the output head (``x @ permute_dims(E)``). The
build pre-transposes the head's weight (``FoldConstant``) and may pack it into panels, so the
library stored ``E`` for the lookup *and* a transformed copy for the head: 113 MB more for
SmolLM2-135M's 49152 x 576 vocabulary, in the file, in the compile's peak memory and in the
device's. Here the lookup is rewritten, before legalization, to gather columns of the same
``permute_dims(E)`` the head uses; :func:`dedup_constants` (after ``FoldConstant``) makes both
point at one folded constant, and a constant that several kernels read is not repacked for one
of them (``_mark_constant_operands``), so ``E^T`` is the only copy. A lookup reads ``H`` strided
values per token, nothing next to the head's ``V x H`` multiply-adds per token.
"""

from __future__ import annotations

import hashlib

import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

from .common import mutate_relax_functions, permuted_constant


def _transposed_constants(mod) -> set:
    """Data handles of the 2-D constants some expression of ``mod`` transposes."""
    found: set = set()

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", None) == \
                "relax.permute_dims" and isinstance(expr.args[0], tvm.ir.expr.Constant):
            axes = expr.attrs.axes
            value = expr.args[0].value
            if len(value.shape) == 2 and (axes is None or [int(a) for a in axes] == [1, 0]):
                found.add(_key(value))

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


def _key(value) -> tuple:
    """Identity of a constant's data: where its bytes are, its shape and dtype."""
    return (data_address(value), tuple(int(s) for s in value.shape), str(value.dtype))


def data_address(value) -> int:
    """Address of a tensor's first byte: two constants imported from one torch tensor share it.

    ``Tensor.data_ptr`` works for every dtype (numpy cannot view bfloat16), and unlike the
    Python wrapper's ``id`` it is stable: each ``Constant.value`` access builds a new wrapper,
    so an ``id``-based key found on one visit is missing on the next (a bf16 build failed so)."""
    return int(value.data_ptr())


@expr_functor.mutator
class _TiedLookup(PyExprMutator):
    def __init__(self, mod, transposed: set) -> None:
        super().__init__(mod)
        self.transposed = transposed

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if getattr(call.op, "name", None) != "relax.take" or len(call.args) != 2:
            return call
        axis = call.attrs.axis
        found = permuted_constant(self, call.args[0])
        if found is None or found[1] is not None or axis is None or int(axis) != 0:
            return call
        table = found[0]
        if _key(table.value) not in self.transposed:
            return call
        bb = self.builder_
        columns = bb.emit(relax.op.permute_dims(table, [1, 0]))
        gathered = bb.emit(relax.op.take(columns, call.args[1], axis=1))
        rank = len(gathered.ty.shape)
        return relax.op.permute_dims(gathered, [*range(1, rank), 0])


@tvm.transform.module_pass(opt_level=0, name="SlimcTiedEmbedding")
def tied_embedding(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Rewrite ``take(E, ids, axis=0)`` to read ``permute_dims(E)`` when ``E`` is also
    transposed elsewhere (a tied output head)."""
    transposed = _transposed_constants(mod)
    if not transposed:
        return mod
    return mutate_relax_functions(mod, _TiedLookup(mod, transposed))


@tvm.transform.module_pass(opt_level=0, name="SlimcDedupConstants")
def dedup_constants(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Make constants with equal type and bytes one object, so the library stores each once
    (``FoldConstant`` evaluates every ``permute_dims(E)`` separately)."""
    import numpy as np

    constants: dict[tuple, list] = {}

    def visit(expr) -> None:
        if isinstance(expr, tvm.ir.expr.Constant) and isinstance(expr.value, tvm.runtime.Tensor):
            value = expr.value
            constants.setdefault((tuple(int(s) for s in value.shape), str(value.dtype)),
                                 []).append(expr)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    replace: dict = {}
    for group in constants.values():
        distinct = {_key(c.value): c for c in group}
        if len(distinct) < 2:
            continue
        by_digest: dict[bytes, object] = {}
        for key, const in distinct.items():
            try:
                data = np.from_dlpack(const.value)
            except Exception:  # noqa: BLE001 - dtypes numpy cannot view: leave them
                continue
            digest = hashlib.blake2b(memoryview(np.ascontiguousarray(data)).cast("B"),
                                     digest_size=16).digest()
            first = by_digest.setdefault(digest, const)
            if first is not const:
                replace[key] = first
    if not replace:
        return mod

    @expr_functor.mutator
    class _Same(PyExprMutator):
        def visit_generic_const_(self, op):  # TVM's visitor name for constants
            if isinstance(op.value, tvm.runtime.Tensor):
                return replace.get(_key(op.value), op)
            return op

    return mutate_relax_functions(mod, _Same(mod))
