"""Winograd convolutions: 3x3 stride-1 convs as ``F(m x m, 3 x 3)`` tile transforms + a GEMM.

A direct 3x3 conv spends 9 multiply-adds per output pixel and input channel, and slimc's direct
conv kernels already run near the FMA peak of the host, so the only way left to make a ResNet
faster is to do fewer multiplies. Winograd's minimal filtering computes an ``m x m`` output tile
from an ``(m+2) x (m+2)`` input tile with ``(m+2)^2`` products per channel pair instead of
``9 m^2``: 2.25x fewer for ``m = 2``, 4x fewer for ``m = 4`` (Lavin & Gray, 2015).

This Relax pass (run after convs are made NHWC, before legalization) rewrites each eligible
``conv2d`` into three kernels:

1. ``winograd_input``: ``V[k, p, c] = (B^T d_p B)[k]`` for every input tile ``p`` (the conv's
   zero padding is read through a pad that the schedule inlines);
2. a batched ``matmul`` ``M[k] = V[k] @ U[k]`` with ``U = G g G^T``, the filter transformed
   **at build time** (a constant, like every other weight layout slimc prepares), which the
   register-tiled matmul rule schedules;
3. ``winograd_output``: ``Y = A^T M_p A`` scattered back to NHWC, into which the conv's
   epilogue (batch norm, residual add, ReLU) is fused as usual.

The transforms are written as one constant linear combination per tile position, selected by
the position index; :class:`WinogradTransform` unrolls that index, so every selection is a
compile-time constant and only the non-zero terms remain, and vectorizes over channels.

Eligibility is a cost decision, not a correctness one (:func:`tile_size`): the transformed
filter is ``(m+2)^2 / 9`` times larger than the direct one (1.8x for ``m = 2``, 4x for
``m = 4``) and each element is reused once per tile, so tiny feature maps stay direct convs and
large filters get the smaller tile. Numerically the
transforms add rounding error (a few 1e-6 relative in float32 for ``m = 4``), well inside the
artifact verification tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx, topi
from tvm.relax import PyExprMutator, expr_functor
from tvm.target import Target

from slimc.backend import WinogradRule

from .common import (
    extent,
    inline_spatial,
    intermediate_buffers,
    mutate_relax_functions,
    permuted_constant,
    pick_tile,
    vector_lanes,
)

#: ``(A^T, G, B^T)`` of ``F(m, 3)`` (Lavin & Gray; interpolation points 0, +-1, +-2, inf).
MATRICES: dict[int, tuple[list[list[float]], ...]] = {
    2: ([[1, 1, 1, 0], [0, 1, -1, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
    4: ([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
}

#: Fewest tiles worth a Winograd conv: each transformed filter element is reused once per tile.
MIN_TILES = 16
#: Largest direct filter given 4x4 output tiles (whose transformed filter is 4x larger) and
#: largest given 2x2 tiles (1.8x larger): above these the artifact grows a lot for little speed.
LARGE_TILE_MAX_FILTER_BYTES = 1 << 20
SMALL_TILE_MAX_FILTER_BYTES = 4 << 20
#: The eligibility rule (shared with passes through ``TargetInfo.winograd``).
RULE = WinogradRule(MIN_TILES, LARGE_TILE_MAX_FILTER_BYTES, SMALL_TILE_MAX_FILTER_BYTES)
#: Block names the schedule rule recognises.
INPUT_BLOCK, OUTPUT_BLOCK = "winograd_input", "winograd_output"
#: Block annotation carrying ``m`` (the output tile) to the schedule rule.
TILE_ATTR = "slimc.winograd_tile"
#: Block annotation of a transform's first (separable) stage, computed per tile into registers.
STAGE_ATTR = "slimc.winograd_stage"


def tile_size(batch: int, out_h: int, out_w: int, channels_in: int,
              channels_out: int) -> int | None:
    """The ``m`` of ``F(m x m, 3 x 3)`` for a conv, or None to keep the direct conv.

    Measured on ResNet-18 (2 Zen 4 cores, whole networks timed interleaved): with 4x4 tiles on
    the 56x56 and 28x28 stages and 2x2 on the 14x14 one, the network ran 11.2-12.1 ms; 2x2 tiles
    on the 7x7 stage too saved another 4-7 % but grew the library from 60 to 82 MB (its 9.4 MB
    filters become 16.8 MB), and 4x4 tiles everywhere were no faster than that at 1.9x the
    filter bytes. slimc is a compression tool: those stay direct. The rule is
    :data:`RULE`, which the CPU backend's ``target_info`` also hands to cost decisions.
    """
    return RULE.tile(batch, out_h, out_w, channels_in, channels_out)


def transform_filter(weight_hwio: np.ndarray, m: int) -> np.ndarray:
    """``U[k, ci, co] = (G g G^T)[k]`` for a ``3 x 3 x ci x co`` filter, in float64 -> float32."""
    g = np.asarray(MATRICES[m][1], dtype=np.float64)
    u = np.einsum("ai,ijco,bj->abco", g, weight_hwio.astype(np.float64), g)
    alpha = m + 2
    return u.reshape(alpha * alpha, *weight_hwio.shape[2:]).astype(np.float32)


def _combination(coeffs, load) -> tirx.PrimExpr:
    """``sum coeffs[i] * load(i)`` over the non-zero coefficients, as a TIR expression."""
    expr = None
    for i, c in enumerate(coeffs):
        if c == 0:
            continue
        term = load(i)
        if c == -1:
            expr = (-term) if expr is None else expr - term
            continue
        if c != 1:
            term = term * tirx.const(float(c), "float32")
        expr = term if expr is None else expr + term
    return expr if expr is not None else tirx.const(0.0, "float32")


def _select(index: tirx.PrimExpr, choices: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """``choices[index]`` as a chain of selects (constant once ``index`` is unrolled)."""
    expr = choices[-1]
    for i in range(len(choices) - 2, -1, -1):
        expr = tirx.Select(index == i, choices[i], expr)
    return expr


def _rows(matrix: np.ndarray, index: tirx.PrimExpr, load) -> tirx.PrimExpr:
    """``(matrix @ v)[index]`` where ``v[i] = load(i)``: one short combination per row."""
    return _select(index, [_combination(row, load) for row in matrix])


def input_transform(x: te.Tensor, m: int, pad_top: int, pad_left: int, tiles_h: int,
                    tiles_w: int) -> te.Tensor:
    """``V[k, p, c]``: every ``(m+2) x (m+2)`` input tile ``p`` of NHWC ``x``, transformed.

    ``B^T d B`` in two separable stages (columns, then rows), so each output is a combination
    of at most ``m+2`` values and the code unrolled per tile position stays small.
    """
    n, h, w, c = (int(d) for d in x.shape)
    alpha = m + 2
    bt = np.asarray(MATRICES[m][2], dtype=np.float64)
    padded = topi.nn.pad(x, [0, pad_top, pad_left, 0],
                         [0, tiles_h * m + 2 - pad_top - h, tiles_w * m + 2 - pad_left - w, 0],
                         name="winograd_pad")
    per_image = tiles_h * tiles_w

    def columns(i, nu, p, ci):  # (d B)[i, nu]
        b, rest = p // per_image, p % per_image
        y, xx = rest // tiles_w * m, rest % tiles_w * m
        return _rows(bt, nu, lambda j: padded[b, y + i, xx + j, ci])

    half = te.compute((alpha, alpha, n * per_image, c), columns, name=INPUT_BLOCK + "_columns",
                      attrs={STAGE_ATTR: 1})
    return te.compute(
        (alpha * alpha, n * per_image, c),
        lambda k, p, ci: _rows(bt, k // alpha, lambda i: half[i, k % alpha, p, ci]),
        name=INPUT_BLOCK, attrs={TILE_ATTR: m})


def output_transform(mm: te.Tensor, m: int, n: int, out_h: int, out_w: int,
                     tiles_w: int) -> te.Tensor:
    """NHWC ``Y``: each output pixel from its tile's ``A^T M_p A`` (tiles cropped at the edge)."""
    alpha = m + 2
    at = np.asarray(MATRICES[m][0], dtype=np.float64)
    per_image = math.ceil(out_h / m) * tiles_w

    half = te.compute(  # (A^T M)[a, nu]
        (m, alpha, int(mm.shape[1]), int(mm.shape[2])),
        lambda a, nu, p, co: _rows(at, a, lambda e: mm[e * alpha + nu, p, co]),
        name=OUTPUT_BLOCK + "_rows", attrs={STAGE_ATTR: 1})

    def pixel(b, y, xx, co):
        p = b * per_image + y // m * tiles_w + xx // m
        return _rows(at, xx % m, lambda nu: half[y % m, nu, p, co])

    return te.compute((n, out_h, out_w, int(mm.shape[2])), pixel, name=OUTPUT_BLOCK,
                      attrs={TILE_ATTR: m})


@expr_functor.mutator
class _WinogradConvs(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        plan = self._plan(call)
        if plan is None:
            return call
        x, weight, m, (pad_top, pad_left), (n, out_h, out_w) = plan
        tiles_h, tiles_w = math.ceil(out_h / m), math.ceil(out_w / m)
        bb = self.builder_
        v = bb.emit_te(input_transform, x, m, pad_top, pad_left, tiles_h, tiles_w,
                       primfunc_name_hint="winograd_input")
        u = relax.const(transform_filter(weight, m))
        mm = bb.emit(relax.op.matmul(v, u))
        return bb.emit_te(output_transform, mm, m, n, out_h, out_w, tiles_w,
                          primfunc_name_hint="winograd_output")

    def _plan(self, call: relax.Call):
        if getattr(call.op, "name", None) != "relax.nn.conv2d":
            return None
        attrs = call.attrs
        if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) \
                != ("NHWC", "HWIO", "NHWC") or int(attrs.groups) != 1 \
                or [int(s) for s in attrs.strides] != [1, 1] \
                or [int(d) for d in attrs.dilation] != [1, 1] \
                or str(attrs.out_dtype) not in ("float32", ""):
            return None
        x, w = call.args
        weight = self._constant(w)
        ty = getattr(call, "ty", None)
        if weight is None or weight.shape[:2] != (3, 3) or weight.dtype != np.float32 \
                or not isinstance(ty, relax.TensorType) or str(ty.dtype) != "float32":
            return None
        shape = [getattr(d, "value", None) for d in ty.shape]
        if None in shape:
            return None
        n, out_h, out_w, _ = (int(d) for d in shape)
        m = tile_size(n, out_h, out_w, *weight.shape[2:])
        if m is None:
            return None
        pad = [int(p) for p in attrs.padding]
        return x, weight, m, (pad[0], pad[1]), (n, out_h, out_w)

    def _constant(self, expr) -> np.ndarray | None:
        """The filter as HWIO numpy, through the ``permute_dims`` ConvertLayout put on it."""
        found = permuted_constant(self, expr)
        if found is None:
            return None
        value = found[0].value.numpy()
        return np.transpose(value, found[1]) if found[1] is not None else value


@tvm.transform.module_pass(opt_level=0, name="SlimcWinogradConvs")
def winograd_convs(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Rewrite eligible NHWC 3x3 stride-1 convs with constant filters to Winograd kernels."""
    return relax.transform.DeadCodeElimination()(mutate_relax_functions(mod, _WinogradConvs(mod)))


class WinogradTransform:
    """Schedule rule for the tile transforms.

    Tiles run in parallel; per tile and channel vector, the first (separable) stage is computed
    into a small local buffer that LLVM keeps in registers, and both stages are unrolled over
    the tile positions, which turns every ``select`` into a constant choice. Producers (the
    pad, the previous layer's batch norm and ReLU that fusion put in front of the input
    transform) and the conv's epilogue are inlined.
    """

    name = "winograd-transform"

    def apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
        blocks = list(sch.get_child_blocks(root))
        tiles = {sch.get(b).name_hint: int(sch.get(b).annotations[TILE_ATTR])
                 for b in blocks if TILE_ATTR in sch.get(b).annotations}
        stages = [b for b in blocks if STAGE_ATTR in sch.get(b).annotations]
        if len(tiles) != 1 or len(stages) != 1:
            return None
        stage = stages[0]
        rest = inline_spatial(sch, [b for b in blocks if not b.same_as(stage)],
                              intermediate_buffers(sch))
        if len(rest) != 1:
            return None
        final = rest[0]
        loops = sch.get_loops(final)
        lanes = vector_lanes(target, 32)
        vectors = [lanes, lanes // 2, 4, 2, 1]  # channel chunk: the widest with no tail
        if INPUT_BLOCK in tiles:  # (k, p, c): tiles in parallel, k unrolled per channel vector
            k, p, c = loops
            co, ci = sch.split(c, factors=[None, pick_tile(extent(sch, c), vectors)])
            sch.reorder(p, co, k, ci)
            sch.parallel(p)
            unrolled = [k]
        else:  # (n, y, x, c): output tiles in parallel, the m x m tile positions unrolled
            m = tiles[OUTPUT_BLOCK]
            n, y, x, c = loops
            yo, yi = sch.split(y, factors=[None, m])
            xo, xi = sch.split(x, factors=[None, m])
            co, ci = sch.split(c, factors=[None, pick_tile(extent(sch, c), vectors)])
            sch.reorder(n, yo, xo, co, yi, xi, ci)
            sch.parallel(sch.fuse(n, yo, xo))
            unrolled = [yi, xi]
        sch.compute_at(stage, co, preserve_unit_loops=True)
        sch.set_scope(stage, 0, "local")
        for loop in unrolled:
            sch.unroll(loop)
        sch.vectorize(ci)
        # The stage's own loops sit under the two outer ones (tiles, channel vector).
        *stage_outer, stage_inner = sch.get_loops(stage)[2:]
        for loop in stage_outer:
            sch.unroll(loop)
        sch.vectorize(stage_inner)
        return sch
