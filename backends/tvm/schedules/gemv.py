"""Matrix-vector products (decode steps) on weights packed into contiguous output panels.

A decode step multiplies one (or a few) activation rows by every weight matrix of the model: it
is a weight stream, and its speed is the rate at which the weights come in from memory. The
generic matmul path stores a linear layer's weight pre-transposed, ``W^T [K, N]``, so a task that
owns a block of output columns reads a short slice of every one of the ``K`` rows -- ``K``
strided streams. This Relax pass (run before legalization, while the weights are still
``permute_dims(constant)``) rewrites such products to the panel kernel the quantized ops use
(:func:`slimc.backends.tvm.quantized_ops.linear_kernel`, kind ``fp32``): the weight is packed
at build time as ``[N/t, K, t]`` (``t`` = 64 where it divides ``N``: four vectors, four
independent multiply-add chains), so each parallel task streams one contiguous ``K x t`` panel
and keeps ``t`` output lanes in registers. On the host, for SmolLM2's shapes, that is 2-4x
faster per matrix (576x49152 output head: 19 -> 8 ms, interleaved A/B).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

from .common import mutate_relax_functions, permuted_constant, static_dims

#: Largest number of activation rows rewritten (a decode step has 1; short prompts a few).
MAX_ROWS = 4
#: Output columns that no whole vector divides (an ImageNet classifier's 1000 classes on
#: AVX-512: only 8-lane panels) are zero-padded to whole two-vector panels when that adds at
#: most this share of columns (:func:`padded_columns`) ...
MAX_PAD_FRACTION = 1 / 8
#: ... and the padded weight is at most this many bytes: a generation artifact whose prefill
#: matmul reads the same weight stores the GEMV's padded copy beside it (not shared), so
#: a language-model head (100+ MB) keeps its unpadded panels.
PAD_MAX_WEIGHT_BYTES = 16 << 20



@expr_functor.mutator
class _PanelGemv(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if getattr(call.op, "name", None) != "relax.matmul" or len(call.args) != 2:
            return call
        x, rhs = call.args
        weight = self._constant_transposed(rhs)
        x_ty = getattr(x, "ty", None)
        if weight is None or not isinstance(x_ty, relax.TensorType) \
                or str(x_ty.dtype) != "float32":
            return call
        shape = static_dims(x_ty.shape)
        if shape is None or len(shape) < 2:
            return call
        n, k = (int(d) for d in weight.value.shape)
        m = int(np.prod(shape[:-1]))
        if shape[-1] != k or m > MAX_ROWS:
            return call
        from slimc.backends.tvm.quantized_ops import add_kernel, linear_kernel

        columns = padded_columns(n, k)
        if columns != n:  # zero output columns, cropped below
            padded = np.zeros((columns, k), "float32")
            padded[:n] = weight.value.numpy()
            weight = relax.const(padded, "float32")
        t = shared_panel_width(columns)
        bb = self.builder_
        tiles = bb.emit(relax.op.permute_dims(
            relax.op.reshape(weight, (columns // t, t, k)), [0, 2, 1]))
        func = linear_kernel("fp32", m, k, columns, tile=t)
        if columns != n:
            # opaque: operator fusion would otherwise put the crop into this hand-scheduled
            # kernel's group, which FuseTIR rejects ("Inconsistent buffers y and lv3 mapped
            # to the same relax var"); the crop fuses with the bias add after it instead
            func = func.with_attr("op_pattern", 8)
        gvar = add_kernel(bb, func)
        flat = bb.emit(relax.op.reshape(x, (m, k)))
        y = bb.emit(relax.call_tir(gvar, [flat, tiles],
                                   relax.TensorType((m, columns), "float32")))
        if columns != n:
            y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[n]))
        return relax.op.reshape(y, (*shape[:-1], n))

    def _constant_transposed(self, expr) -> tvm.ir.expr.Constant | None:
        """``W [N, K]`` if ``expr`` is ``permute_dims(W, [1, 0])`` of a float32 constant."""
        found = permuted_constant(self, expr)
        if found is None or found[1] != [1, 0]:
            return None
        weight = found[0]
        return weight if str(weight.value.dtype) == "float32" else None


def padded_columns(n: int, k: int) -> int:
    """``N`` rounded up to whole two-vector panels when no vector divides it (within
    :data:`MAX_PAD_FRACTION` and :data:`PAD_MAX_WEIGHT_BYTES`), else ``n``.

    Why: the panel kernel keeps one ``t``-lane accumulator chain per panel, and ``t`` must
    divide ``N``; for 1000 classes on AVX-512 that is 8 lanes, half a vector, one multiply-add
    chain bound by the FMA latency: MobileNetV3-Large's 1280 -> 1000 classifier took 154 us
    at 2 threads next to 101 us for its larger 960 -> 1280 layer on 32-lane panels (this Intel
    host). Padded to 1024 columns (2.4% more weight) it runs 32-lane panels; the zero
    columns are cropped from the output. Targets whose vector divides ``N`` (AVX2's 8 lanes,
    NEON's 4, for 1000) are unchanged.
    """
    from tvm.target import Target

    from .common import vector_lanes

    target = Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return n
    lanes = vector_lanes(target, 32)
    if n % lanes == 0:
        return n
    columns = -(-n // (2 * lanes)) * 2 * lanes
    if columns - n > n * MAX_PAD_FRACTION or columns * k * 4 > PAD_MAX_WEIGHT_BYTES:
        return n
    return columns


def shared_panel_width(n: int) -> int:
    """Panel width of an fp32 weight ``[N, K]`` for the GEMV: the width the tiled matmul packs
    the same weight into for several rows (:func:`.cpu_matmul.panel_width`), when it divides
    ``N``. Why: a generation artifact multiplies each weight in a prefill matmul (many rows) and
    a decode GEMV (one row); with equal panels the two folded constants are byte-identical and
    ``share_constants`` stores the weight once (with 64-wide GEMV panels SmolLM2's fp32
    ``model.so`` held every layer weight twice: 1027 MiB for 513 MiB of weights)."""
    from slimc.backends.tvm.quantized_ops import tile_for
    from tvm.target import Target

    from .common import vector_lanes
    from .cpu_matmul import panel_width

    target = Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return tile_for(n, "fp32")
    width = panel_width(n, vector_lanes(target, 32))
    return width if n % width == 0 and n > width else tile_for(n, "fp32")


@tvm.transform.module_pass(opt_level=0, name="SlimcPanelGemv")
def panel_gemv(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Rewrite ``x @ permute_dims(W)`` with few rows to the packed-panel GEMV kernel."""
    return relax.transform.DeadCodeElimination()(mutate_relax_functions(mod, _PanelGemv(mod)))
