"""Fused attention for short sequences: ``softmax(Q @ K^T ...) @ V`` in one kernel.

For small attentions (BERT-base at 128 tokens, ViT-S/16's 197, MiniLM) the separate kernels
of :mod:`.attention_softmax` (the ``Q @ K^T`` matmul, the row softmax, the ``P @ V`` matmul)
each sum to less than ONNX Runtime's, yet the whole SDPA call cost 1.5-2x ORT's (wt/soft21):
three parallel launches per layer, and a ``heads x L x L`` score tensor written by one kernel
and read back by the next two. Here the whole chain is one parallel loop over
``heads x row blocks``: each task computes a block of score rows into a scratch that stays in
L1/L2 (``ROW_BLOCK`` rows x the keys), applies the chain's elementwise steps (a scale, an
additive mask or position bias) as it stores them, runs the softmax on them in place and
multiplies by ``V``, folding the ``1 / sum`` of the softmax into the output rows.

Only for constant shapes, fp32, a key count up to :data:`MAX_KEYS` (longer attentions keep
the separate kernels that wt/attn20 and wt/soft21 tuned; past 512 keys the row blocks shrink
so a task's scores stay in L2: Whisper-tiny's 1500 keys ran 0.78x the separate kernels'
time, wt/attn23), head widths of whole vectors, and ``K^T`` / ``V`` of the same heads as
``Q`` (no broadcasting). A key count that is not whole vectors pads ``K^T``'s columns with
zeros (fused into its head copy), the padded scores masked to ``-inf`` in the kernel; ``P @ V``
runs over the valid keys only. ``Q`` and ``V`` are read, and the output written, in the
projections' layouts where the model splits / merges heads with permutes
(:mod:`.attention_views`): no head copies but ``K^T``'s.

SDPA's "safe" softmax (a row masked entirely gives zeros, not NaN) is kept: the row sum of an
all ``-inf`` row is tiny (< 0.5, any other row's is >= 1), its output row is zeros. The same
``fast_exp`` polynomial as the row kernel. Works for any vector width (NEON: 4 lanes).
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import tvm
from tvm import relax, tirx
from tvm.relax import PyExprMutator, expr_functor

from .attention_softmax import _exp, _op, _pad_last, _SafeSoftmax
from .attention_views import Layout, View, consumers_of, input_view, output_view
from .common import mutate_relax_functions, simd_registers, static_dims, vector_lanes

#: False turns the fusion off (the separate kernels of :mod:`.attention_softmax`), for A/B.
ENABLED = True
#: False passes ``Q``, ``V`` and the output through their head copies (dense per-head
#: operands) instead of reading / writing the projections' layouts (:mod:`.attention_views`).
HEAD_VIEWS = True
#: Key counts up to this are fused; longer attentions keep the tuned separate kernels (the
#: scores of one task, :data:`SCRATCH_FLOATS`, would fall under 4 rows).
MAX_KEYS = 2048
#: Score rows per task (a multiple of :data:`ROWS`); a task reads its head's ``K^T`` and ``V``.
ROW_BLOCK = 64
#: ... fewer when the keys are many: a task's scores stay at most this many floats (128 KB,
#: 64 rows of 512 keys), in L2 (Whisper's 1500 keys: 20 rows).
SCRATCH_FLOATS = 64 * 512
#: Rows of the register tile (``ROWS x KEY_VECTORS`` vector accumulators for ``Q @ K^T``,
#: ``ROWS x head width / lanes`` for ``P @ V``).
ROWS = 4
#: Key vectors of the ``Q @ K^T`` register tile.
KEY_VECTORS = 4
#: Targets with 16 SIMD registers (AVX2, SSE): the tiles above hold 16 accumulators (``Q @
#: K^T``) and ``4 x width / lanes`` (``P @ V``: 32 for a 64-wide head in 8-lane vectors), more
#: than the register file, and LLVM spilled them to the stack every step. There the tiles are
#: ``NARROW_ROWS x NARROW_VECTORS`` for both products, ``P @ V`` walking the head width
#: ``NARROW_VECTORS`` vectors at a time over the task's probabilities (still in L1). ViT-S's
#: 6 x 197 x 64 attention alone on Zen 3 (2 threads, ``benchmarks/attention_ab.py``): the
#: kernel 0.55-0.63 ms at 4 x 2, 0.70-0.76 at 6 x 2 and 4 x 3 (12 accumulators), 0.89 at 4 x 4,
#: 1.00 at 8 x 1.
NARROW_ROWS = 4
NARROW_VECTORS = 2
#: ... and ``Q @ K^T`` walks each key chunk (``width x NARROW_VECTORS`` vectors of ``K^T``, in
#: L1) over all the row tiles of its task before the next chunk, instead of streaming the
#: head's whole ``K^T`` (Whisper's 64 x 1504: 385 KB, past L1) once per tile; ``P @ V`` walks
#: each width chunk of ``V`` over all the row tiles likewise (both targets: on 32-register ones
#: the head width is one chunk).
KEYS_OUTSIDE = True
#: ... and ``P @ V`` over more keys than this runs in blocks of this many keys, all the width
#: chunks and row tiles of a block before the next (partial sums in a scratch of the task's
#: rows), so a block of ``V`` stays in L1 while every tile reads it (Whisper's 1500 keys).
PV_KEY_BLOCK = 64


def register_tiles(registers: int, width_vectors: int) -> tuple[int, int, int]:
    """``(rows, key vectors, P @ V width vectors)`` of the kernel's register tiles for a target
    with ``registers`` SIMD registers and heads ``width_vectors`` vectors wide."""
    if registers >= 32:
        return ROWS, KEY_VECTORS, width_vectors
    chunk = next(c for c in range(min(NARROW_VECTORS, width_vectors), 0, -1)
                 if width_vectors % c == 0)
    return NARROW_ROWS, NARROW_VECTORS, chunk


class Step(NamedTuple):
    """One elementwise step between ``Q @ K^T`` and the softmax: ``op`` with the scores at
    argument ``pos`` and ``value`` (a float) or the mask tensor (``value is None``)."""

    op: str
    pos: int
    value: float | None


def _apply(x, steps: list[Step], mask_value):
    for step in steps:
        other = mask_value if step.value is None else tirx.const(step.value, "float32")
        a, b = (x, other) if step.pos == 0 else (other, x)
        x = _BINARY[step.op](a, b)
    return x


_BINARY = {"relax.multiply": operator.mul, "relax.divide": operator.truediv,
           "relax.add": operator.add, "relax.subtract": operator.sub}


def attention_kernel(groups: int, heads: int, length: int, width: int, n: int, valid: int,
                     steps: list[Step], mask_shape: tuple[int, int, int, int] | None,
                     check: bool, lanes: int, q_layout: Layout | None = None,
                     v_layout: Layout | None = None,
                     out_layout: Layout | None = None, registers: int = 32) -> tirx.PrimFunc:
    """The fused kernel (module docstring) over ``q (groups, length, width)``,
    ``kt (groups, width, n)``, ``v (groups, >= valid, width)`` [, ``mask`` of ``mask_shape``,
    which broadcasts over ``(groups // heads, heads, length, n)``] -> ``(groups, length,
    width)``. Only the first ``valid`` of the ``n`` keys count (the rest are padding). ``q``,
    ``v`` and the output are flat buffers indexed through their :class:`.attention_views.Layout`
    (default: dense), which must keep ``v``'s and the output's columns contiguous.
    ``registers``: the target's SIMD registers (:func:`register_tiles`)."""
    from tvm.script import tirx as T

    ql = q_layout or Layout.dense(groups, length, width)
    vl = v_layout or Layout.dense(groups, valid, width)
    ol = out_layout or Layout.dense(groups, length, width)
    if n % lanes or width % lanes or not 0 < valid <= n or vl.strides[3] != 1 \
            or ol.strides[3] != 1:
        raise ValueError(f"attention_kernel: {n} keys ({valid} valid), width {width}, "
                         f"vectors of {lanes}, v / out column strides {vl.strides[3]} / "
                         f"{ol.strides[3]}")
    dv = width // lanes
    rows_t, key_vectors, dvc = register_tiles(registers, dv)
    rb = min(-(-length // rows_t) * rows_t, ROW_BLOCK // rows_t * rows_t,
             max(rows_t, SCRATCH_FLOATS // n // rows_t * rows_t))
    blocks = -(-length // rb)
    tiles = rb // rows_t
    tasks = groups * blocks
    nvec = n // lanes
    kv = min(key_vectors, nvec)
    chunks, rest = nvec // kv, nvec % kv
    wchunks = dv // dvc
    keys_outside = bool(registers < 32 and KEYS_OUTSIDE)
    key_block = valid if registers >= 32 or valid <= PV_KEY_BLOCK else PV_KEY_BLOCK
    kblocks = -(-valid // key_block)
    last = length - 1
    neg_inf = tirx.const(float("-inf"), "float32")
    lowest = tirx.min_value("float32")
    has_mask = mask_shape is not None
    mb, mh, ml, mk = mask_shape or (1, 1, 1, 1)

    def score(acc_value, g, i, j, mask):
        m = None
        if has_mask:
            m = mask[g // heads if mb > 1 else 0, g % heads if mh > 1 else 0,
                     i if ml > 1 else 0, j if mk > 1 else 0]
        value = _apply(acc_value, steps, m)
        if valid < n:
            value = tirx.Select(j < valid, value, neg_inf)
        return value

    @T.macro
    def qk(q, kt, s, acc, mask, g, i0, t, j0, nv):
        for a in T.unroll(rows_t * nv):
            for lane in T.vectorized(lanes):
                acc[a * lanes + lane] = T.float32(0)
        for d in range(width):
            for u in T.unroll(nv):
                for r in T.unroll(rows_t):
                    for lane in T.vectorized(lanes):
                        acc[(r * nv + u) * lanes + lane] = acc[(r * nv + u) * lanes + lane] + \
                            q[ql.offset(g, T.min(i0 + r, last), d)] * \
                            kt[g, d, j0 + u * lanes + lane]
        for r in T.unroll(rows_t):
            for u in T.unroll(nv):
                for lane in T.vectorized(lanes):
                    s[t * rows_t + r, j0 + u * lanes + lane] = score(
                        acc[(r * nv + u) * lanes + lane], g, T.min(i0 + r, last),
                        j0 + u * lanes + lane, mask)

    @T.macro
    def pv(s, v, acc, g, t, w, k0, k1):
        for k in range(k0, k1):
            for u in T.unroll(dvc):
                for r in T.unroll(rows_t):
                    for lane in T.vectorized(lanes):
                        acc[(r * dvc + u) * lanes + lane] = \
                            acc[(r * dvc + u) * lanes + lane] + \
                            s[t * rows_t + r, k] * \
                            v[vl.offset(g, k, (w * dvc + u) * lanes + lane)]

    @T.macro
    def store(out, acc, inv, g, base, t, w):
        for r in T.unroll(rows_t):
            if base + t * rows_t + r < length:
                for u in T.unroll(dvc):
                    for lane in T.vectorized(lanes):
                        out[ol.offset(g, base + t * rows_t + r,
                                      (w * dvc + u) * lanes + lane)] = \
                            acc[(r * dvc + u) * lanes + lane] * inv[t * rows_t + r]

    @T.macro
    def body(q, kt, v, mask, out):
        for task in T.parallel(tasks):
            s = T.alloc_buffer((rb, n), "float32")
            inv = T.alloc_buffer((rb,), "float32")
            acc = T.alloc_buffer((rows_t * max(kv, dvc) * lanes,), "float32")
            vm = T.alloc_buffer((lanes,), "float32")
            g: T.int32 = task // blocks
            base: T.int32 = task % blocks * rb
            if keys_outside:
                for c in range(chunks):
                    for t in range(tiles):
                        if base + t * rows_t < length:
                            qk(q, kt, s, acc, mask, g, base + t * rows_t, t, c * kv * lanes,
                               kv)
                if rest > 0:
                    for t in range(tiles):
                        if base + t * rows_t < length:
                            qk(q, kt, s, acc, mask, g, base + t * rows_t, t,
                               chunks * kv * lanes, rest)
            else:
                for t in range(tiles):
                    if base + t * rows_t < length:
                        for c in range(chunks):
                            qk(q, kt, s, acc, mask, g, base + t * rows_t, t, c * kv * lanes,
                               kv)
                        if rest > 0:
                            qk(q, kt, s, acc, mask, g, base + t * rows_t, t,
                               chunks * kv * lanes, rest)
            for r in range(rb):
                if base + r < length:
                    for lane in T.vectorized(lanes):
                        vm[lane] = lowest
                    for j in range(nvec):
                        for lane in T.vectorized(lanes):
                            vm[lane] = T.max(vm[lane], s[r, j * lanes + lane])
                    mx: T.float32 = vm[0]
                    for lane in range(1, lanes):
                        mx = T.max(mx, vm[lane])
                    for lane in T.vectorized(lanes):
                        vm[lane] = T.float32(0)
                    for j in range(nvec):
                        for lane in T.vectorized(lanes):
                            s[r, j * lanes + lane] = _exp(s[r, j * lanes + lane] - mx) \
                                if valid == n else T.Select(
                                    j * lanes + lane < valid,
                                    _exp(s[r, j * lanes + lane] - mx), T.float32(0))
                            vm[lane] = vm[lane] + s[r, j * lanes + lane]
                    total: T.float32 = vm[0]
                    for lane in range(1, lanes):
                        total = total + vm[lane]
                    inv[r] = T.float32(1) / total
                    if check:
                        inv[r] = T.Select(total < T.float32(0.5), T.float32(0), inv[r])
            if kblocks == 1:
                for w in range(wchunks):
                    for t in range(tiles):
                        if base + t * rows_t < length:
                            for a in T.unroll(rows_t * dvc):
                                for lane in T.vectorized(lanes):
                                    acc[a * lanes + lane] = T.float32(0)
                            pv(s, v, acc, g, t, w, 0, valid)
                            store(out, acc, inv, g, base, t, w)
            else:
                part = T.alloc_buffer((rb, width), "float32")
                for kb in range(kblocks):
                    for w in range(wchunks):
                        for t in range(tiles):
                            if base + t * rows_t < length:
                                if kb == 0:
                                    for a in T.unroll(rows_t * dvc):
                                        for lane in T.vectorized(lanes):
                                            acc[a * lanes + lane] = T.float32(0)
                                else:
                                    for r in T.unroll(rows_t):
                                        for u in T.unroll(dvc):
                                            for lane in T.vectorized(lanes):
                                                acc[(r * dvc + u) * lanes + lane] = part[
                                                    t * rows_t + r, (w * dvc + u) * lanes + lane]
                                pv(s, v, acc, g, t, w, kb * key_block,
                                   T.min(kb * key_block + key_block, valid))
                                if kb == kblocks - 1:
                                    store(out, acc, inv, g, base, t, w)
                                else:
                                    for r in T.unroll(rows_t):
                                        for u in T.unroll(dvc):
                                            for lane in T.vectorized(lanes):
                                                part[t * rows_t + r,
                                                     (w * dvc + u) * lanes + lane] = \
                                                    acc[(r * dvc + u) * lanes + lane]

    if has_mask:
        @T.prim_func(private=True)
        def func(q: T.Buffer((ql.size,), "float32"), kt: T.Buffer((groups, width, n), "float32"),
                 v: T.Buffer((vl.size,), "float32"),
                 mask: T.Buffer((mb, mh, ml, mk), "float32"),
                 out: T.Buffer((ol.size,), "float32")):
            T.func_attr({"tirx.noalias": True})
            body(q, kt, v, mask, out)
    else:
        @T.prim_func(private=True)
        def func(q: T.Buffer((ql.size,), "float32"), kt: T.Buffer((groups, width, n), "float32"),
                 v: T.Buffer((vl.size,), "float32"), out: T.Buffer((ol.size,), "float32")):
            T.func_attr({"tirx.noalias": True})
            body(q, kt, v, None, out)

    from tvm import s_tir

    root = s_tir.SBlock([], [], [], "root", func.body)
    func = func.with_body(s_tir.SBlockRealize([], tirx.const(True, "bool"), root))
    return func.with_attr("op_pattern", 8).with_attr("tirx.is_scheduled", True)


@expr_functor.mutator
class _FusedAttention(PyExprMutator):
    """``P @ V`` of a softmax of ``Q @ K^T`` (through scalar / mask steps) -> one call of
    :func:`attention_kernel`. The chains are found by :class:`.attention_softmax._SafeSoftmax`'s
    analysis (the same walk its padding uses)."""

    def __init__(self, mod, lanes: int, registers: int = 32) -> None:
        super().__init__(mod)
        self.lanes = lanes
        self.registers = registers
        self.chains = _SafeSoftmax(mod, lanes)
        self.plans: dict = {}
        self.bound_to: dict = {}  # planned matmul -> its variable
        self.consumers: dict = {}
        self.merged: dict = {}  # head-merge permute -> the kernel's output (in its layout)

    def plan(self, func: relax.Function) -> None:
        self.chains.plan(func)
        self.consumers.update(consumers_of(func))
        for var, value in relax.analysis.get_var2val(func).items():
            if _op(value) == "relax.matmul":
                plan = self.chains.chain(value)
                if plan is not None and self._fusable(plan) is not None:
                    self.plans[value] = plan
                    self.bound_to[value] = var

    def _fusable(self, plan):
        """``(groups, length, width, heads, mask, mask_shape, steps)`` when :func:`attention_kernel`
        runs ``plan``, else None."""
        q_shape, kt_shape = static_dims(plan.q.ty.shape or []), static_dims(plan.kt.ty.shape or [])
        v_shape = static_dims(plan.v.ty.shape or [])
        if not q_shape or not kt_shape or not v_shape or len(q_shape) < 2:
            return None
        if any(str(x.ty.dtype) != "float32" for x in (plan.q, plan.kt, plan.v)):
            return None
        *lead, length, width = q_shape
        groups = 1
        for d in lead:
            groups *= d
        keys = plan.keys
        if keys > MAX_KEYS or width % self.lanes or kt_shape[-2:] != [width, keys] \
                or v_shape[-2:] != [keys, width] or kt_shape[:-2] != lead or v_shape[:-2] != lead:
            return None
        if plan.probs_shape[-2:] != [length, keys]:
            return None
        heads, mask, mask_shape, steps = groups, None, None, []
        for op, operand, shape in plan.steps:
            if op == "reshape":
                continue
            pos, other, _ = operand
            o_shape = static_dims(getattr(other.ty, "shape", None) or [])
            if o_shape is None or str(getattr(other.ty, "dtype", "")) != "float32":
                return None
            if all(d == 1 for d in o_shape):
                if not isinstance(other, tvm.ir.expr.Constant):
                    return None
                steps.append(Step(op, pos, float(other.value.numpy().reshape(-1)[0])))
                continue
            if mask is not None or len(shape) > 4 or shape[-2:] != [length, keys]:
                return None  # one tensor operand, at (batch, heads, L, keys) or (G, L, keys)
            full = [1] * (4 - len(shape)) + shape
            if full[0] * full[1] != groups:
                return None
            heads = full[1]
            mask = other
            mask_shape = tuple([1] * (4 - len(o_shape)) + o_shape)
            steps.append(Step(op, pos, None))
        return groups, length, width, heads, mask, mask_shape, steps

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if call in self.merged:  # the head merge of a fused output: the kernel wrote it
            return relax.op.reshape(self.merged.pop(call), static_dims(call.ty.shape))
        plan = self.plans.get(call)
        if plan is None:
            return super().visit_call_(call)
        groups, length, width, heads, mask, mask_shape, steps = self._fusable(plan)
        bb = self.builder_
        keys = plan.keys
        n = -(-keys // self.lanes) * self.lanes
        var2val = self.chains.var2val
        q_view = input_view(plan.q, var2val, groups, length, width) if HEAD_VIEWS else None
        v_view = input_view(plan.v, var2val, groups, keys, width) if HEAD_VIEWS else None
        if v_view is not None and (v_view.scale != 1.0 or v_view.layout.strides[3] != 1):
            v_view = None
        merge = output_view(self.bound_to[call], self.consumers, self.chains.uses, groups,
                            length, width) if HEAD_VIEWS else None

        def operand(view: View | None, expr, size: int):
            """The flat tensor the kernel reads and its layout (None: dense)."""
            if view is None:
                return bb.emit(relax.op.reshape(self.visit_expr(expr), [size])), None
            source = self.visit_expr(view.source)
            return bb.emit(relax.op.reshape(source, [view.layout.size])), view.layout

        q, q_layout = operand(q_view, plan.q, groups * length * width)
        kt = bb.emit(relax.op.reshape(self.visit_expr(plan.kt), [groups, width, keys]))
        if q_view is not None and q_view.scale != 1.0:  # into K^T's copy (fused with it)
            kt = bb.emit(relax.op.multiply(kt, relax.const(q_view.scale, "float32")))
        v, v_layout = operand(v_view, plan.v, groups * keys * width)
        if n > keys:
            kt = bb.emit(_pad_last(kt, -1, n - keys, 3))
        args = [q, kt, v]
        if mask is not None:
            args.append(bb.emit(relax.op.reshape(self.visit_expr(mask), list(mask_shape))))
        out_layout = merge[1] if merge is not None else None
        func = attention_kernel(groups, heads, length, width, n, keys, steps, mask_shape,
                                plan.check, self.lanes, q_layout, v_layout, out_layout,
                                self.registers)
        gvar = bb.add_func(func, "fused_attention")
        size = groups * length * width
        out = bb.emit(relax.call_tir(gvar, args, relax.TensorType((size,), "float32")))
        if merge is None:
            return relax.op.reshape(out, static_dims(call.ty.shape))
        permute_var, _ = merge
        permute = self.chains.var2val[permute_var]
        self.merged[permute] = out
        # the matmul's own value (read only by the merge, so dead once the merge is replaced)
        shape = static_dims(permute_var.ty.shape)
        axes = [int(a) for a in permute.attrs.axes]
        inverse = [axes.index(k) for k in range(4)]
        return relax.op.reshape(relax.op.permute_dims(relax.op.reshape(out, shape), inverse),
                                static_dims(call.ty.shape))


def fuse_attention(target) -> tvm.transform.Pass:
    """The Relax pass (before :func:`.attention_softmax.fuse_safe_softmax`)."""

    @tvm.transform.module_pass(opt_level=0, name="SlimcFusedAttention")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not ENABLED:
            return mod
        mutator = _FusedAttention(mod, vector_lanes(target, 32), simd_registers(target))
        for _, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.plan(func)
        if not mutator.plans:
            return mod
        return relax.transform.DeadCodeElimination()(mutate_relax_functions(mod, mutator))

    return _pass
