"""Attention softmax: one kernel for PyTorch's "safe" softmax, rows padded to whole vectors.

``scaled_dot_product_attention`` decomposes (PyTorch >= 2.5, ``_safe_softmax``) into
``where(all(x == -inf, -1), 0, softmax(x))``: a row that is masked out entirely gives zeros,
not NaN. TVM imports that as a softmax plus a second reduction kernel over the scores
(``equal -> logical_not -> cast -> max``, reading all of ``heads x L x L`` scores again) and a
``where`` in the softmax's epilogue. The check is not dead in general (a padding mask can mask
a whole row), but it needs no second pass: a row is all ``-inf`` exactly when its maximum is,
and the softmax computes that maximum anyway. :func:`safe_softmax` is that kernel: the row
maximum starts from ``-inf`` (TVM's ``max`` starts from the lowest finite float, which would
hide an all-``-inf`` row), and the normalize step selects zero on an ``-inf`` maximum.
Rows holding a NaN are NaN either way.

It also multiplies by the reciprocal of the row sum instead of dividing every element
(one ``vdivps`` per vector was a visible share of a 1500-wide row), as ONNX Runtime does.

Key padding (:func:`pad_keys`): the row reductions sum in vector lanes only when a whole number
of vectors makes the row (``cpu_reduction._chunk``); Whisper's 1500 keys got one 4-lane
accumulator (1500 = 375 x 4), a dependency chain of 375 steps per reduction per row, and ViT's
197 none at all. When the scores are ``Q @ K^T`` and the probabilities feed ``P @ V`` directly,
padding ``K^T`` with zero columns and ``V`` with zero rows to whole vectors is exact: the
softmax ignores the padded columns (its maximum and sum skip them, its output there is 0), and
``0 * 0`` adds nothing to ``P @ V``. The pads fuse into the head transposes that already copy
``K`` and ``V``, and the score matmul pads its column tiles anyway (``cpu_matmul``).

Row kernel (:func:`softmax_rows`): when the rows have a constant shape whose length is whole
vectors (after the padding above), the softmax is not a TE compute scheduled by
``cpu_reduction.RowReduction`` but a hand-written loop nest, marked scheduled, in the three
passes ONNX Runtime's MLAS kernel makes: the row maximum in four vector accumulators, ``exp``
written straight to the output while its sum accumulates in a register, then one in-place
scale. The scheduled TE version computed the same in five blocks (two ``rfactor`` reductions
whose partial buffers, lane axis outermost, LLVM assembled with shuffles and scalar
extracts/inserts, an ``exp`` scratch, and a masking select on a 64-bit column index in every
step of the maximum and the ``exp``); Whisper-tiny's ``safe_softmax`` was 14% of its kernel
time against ONNX Runtime's 6% (``profile_kernels.py``, quiet host). Alone, 2 threads, through
bench.sh (``benchmarks/attention_softmax.py --shape H x L x D``, minima): Whisper's 6 x 1500 rows
of 1536 keys 6.82 vs 7.19 ms (near memory speed either way), T5's 8 x 256 of 256 0.14 vs 0.23,
ViT's 6 x 197 of 208 0.09 vs 0.16.

In place (:data:`INPLACE`): the row kernel writes the probabilities over the scores
(``call_tir_inplace``) when nothing else reads them -- the scores the padded chain builds, or
a fresh result read only by the softmax (and SDPA's check, which the kernel absorbs); never a
model input, a parameter or a view of one (:meth:`_SafeSoftmax._fresh`). A second
``heads x L x L`` tensor cost a write-allocate miss per line: Whisper-tiny's 6 x 1500 x 1536
scores (55 MB a layer) after ``Q @ K^T`` ran the softmax in 10.0-11.4 ms with a new output and
7.5-7.9 in place, ONNX Runtime's Softmax 7.8-8.2 (``benchmarks/attention_ab.py``, 2 threads,
loaded host; docs/benchmarks.md, wt/soft21). The exp-and-sum pass keeps
:data:`EXP_ACCUMULATORS` vector sums (one was a 4-cycle ``vaddps`` chain per vector).
"""

from __future__ import annotations

from typing import NamedTuple

import tvm
from tvm import relax, te, tirx, topi
from tvm.relax import PyExprMutator, expr_functor

from .common import mutate_relax_functions, static_dims, vector_lanes


def safe_softmax(x: te.Tensor, valid: int | None = None, check: bool = True) -> te.Tensor:
    """Softmax over the last axis of fp32 ``x`` (``fast_exp``), zeros on an all-``-inf`` row
    when ``check``. ``valid``: only the first ``valid`` columns are the row (the rest is
    padding, ignored, 0 in the output)."""
    *rows, n = x.shape
    pad = valid is not None and int(valid) < int(n)
    neg_inf = tirx.const(float("-inf"), x.dtype)
    zero = tirx.const(0.0, x.dtype)

    def inside(k):
        return k < valid if pad else None

    k1 = te.reduce_axis((0, n), name="k")
    maxelem = te.compute(
        tuple(rows), lambda *r: te.max(tirx.Select(inside(k1), x[(*r, k1)], neg_inf) if pad
                                       else x[(*r, k1)], axis=k1),
        name="T_softmax_maxelem")
    delta = te.compute(x.shape, lambda *i: x[i] - maxelem[i[:-1]], name="T_softmax_delta")
    exp = topi.math.fast_exp(delta)
    if pad:
        exp = te.compute(x.shape, lambda *i: tirx.Select(inside(i[-1]), exp[i], zero),
                         name="T_softmax_exp_valid")
    k2 = te.reduce_axis((0, n), name="k")
    expsum = te.compute(tuple(rows), lambda *r: te.sum(exp[(*r, k2)], axis=k2),
                        name="T_softmax_expsum")
    one, half = tirx.const(1.0, x.dtype), tirx.const(0.5, x.dtype)

    def normalize(*i):
        value = exp[i] * (one / expsum[i[:-1]])
        # An all -inf row: see the module docstring (its sum is ~1e-35, any other row's >= 1).
        return tirx.Select(expsum[i[:-1]] < half, zero, value) if check else value

    return te.compute(x.shape, normalize, name="T_softmax_norm", attrs={"axis": len(rows)})


def _exp(x):
    """TVM's ``fast_exp`` (``topi.math.fast_exp``: the same clamp, polynomial and final
    ``max``) on one TIR expression, so the row kernel rounds as the TE softmax did."""
    def f(v):
        return tirx.const(v, "float32")

    x = tirx.max(tirx.min(x, f(88.376266479492188)), f(-88.376258850097656))
    n = tirx.floor(x * f(1.4426950216293335) + f(0.5))
    r = x - n * f(0.69314718246459961)
    p = f(0.00019875691214110702)
    for c in (0.0013981999363750219, 0.008333452045917511, 0.041665796190500259,
              0.1666666567325592, 0.5):
        p = p * r + f(c)
    p = p * r * r + r + f(1.0)
    two_n = tirx.reinterpret("float32", tirx.shift_left(
        tirx.Cast("int32", n + f(127.0)), tirx.const(23, "int32")))
    return tirx.max(two_n * p, x)


#: Vector accumulators of the exp sum (the exp pass unrolled by as many vectors) when the row
#: has that many whole vectors. Alone, 2 threads, 6 x 1500 rows of 1536: 4 ran 0.93-0.95x the
#: time of 1 (2: 0.98-0.99x); on cached 2 x 1500 rows 0.92-0.95x.
EXP_ACCUMULATORS = 4


#: Parallel chunks of rows per call (a few per thread; see :func:`softmax_rows`).
CHUNKS = 64


#: Rows x length below which the row kernel runs on the calling thread (as ``RowReduction``).
def _min_parallel_work() -> int:
    from .common import MIN_PARALLEL_MEMORY_WORK

    return MIN_PARALLEL_MEMORY_WORK


def softmax_rows(rows: int, n: int, valid: int, check: bool, lanes: int,
                 inplace: bool = False) -> tirx.PrimFunc:
    """The row kernel (module docstring): softmax over the last axis of fp32 ``(rows, n)``,
    only the first ``valid`` columns counted (the rest are 0 in the output), zeros on a row
    whose exp-sum is < 0.5 when ``check`` (an all ``-inf`` row, see :func:`safe_softmax`).

    ``n`` must be whole vectors of ``lanes``. The scratch (a few vectors) is allocated once per
    parallel chunk of rows (:data:`CHUNKS`): TVM's lowering turns it into workspace
    allocations, and once per row their calls made ViT's 208-wide rows 2.4x slower.
    """
    from tvm.script import tirx as T

    if n % lanes or not 0 < valid <= n:
        raise ValueError(f"softmax_rows: {n} columns ({valid} valid) in vectors of {lanes}")
    acc = 4
    nfull = valid // lanes  # whole vectors of valid columns
    part = valid - nfull * lanes  # valid columns of the partial vector (0: none)
    has_part = part > 0
    written = nfull + (1 if has_part else 0)
    zero_tail = n // lanes - written  # vectors of padding only: zeros
    groups = nfull // acc
    rest = nfull - groups * acc
    eacc = EXP_ACCUMULATORS if nfull >= EXP_ACCUMULATORS else 1
    egroups = nfull // eacc
    erest = nfull - egroups * eacc
    parallel = rows > 1 and rows * n >= _min_parallel_work()
    # Rows in chunks: each chunk's scratch is one workspace allocation (the lowering turns the
    # scratch into TVMBackendAllocWorkspace calls; per row they cost 2.4x on ViT's 208 keys).
    chunks = min(rows, CHUNKS) if parallel else 1
    chunk = -(-rows // chunks)
    neg_inf = tirx.const(float("-inf"), "float32")
    # TVM's ``max`` reduction starts from the lowest finite float, not -inf: an all -inf row
    # then gives ``exp(-inf - lowest) = ~0`` (the check's small sum), not ``-inf - -inf = NaN``.
    lowest = tirx.min_value("float32")

    @T.macro
    def body(x, y):
        for c in T.parallel(chunks) if parallel else T.serial(chunks):
            m = T.alloc_buffer((acc * lanes,), "float32")
            s = T.alloc_buffer((eacc * lanes,), "float32")
            for i in range(chunk):
                r: T.int32 = c * chunk + i
                if r < rows:
                    for lane in T.vectorized(acc * lanes):
                        m[lane] = lowest
                    for g in range(groups):
                        for lane in T.vectorized(acc * lanes):
                            m[lane] = T.max(m[lane], x[r, g * acc * lanes + lane])
                    for j in range(rest):
                        for lane in T.vectorized(lanes):
                            m[lane] = T.max(m[lane], x[r, (groups * acc + j) * lanes + lane])
                    if has_part:
                        for lane in T.vectorized(lanes):
                            m[lane] = T.max(m[lane], T.Select(
                                lane < part, x[r, nfull * lanes + lane], neg_inf))
                    for lane in T.vectorized(lanes):
                        m[lane] = T.max(T.max(m[lane], m[lanes + lane]),
                                        T.max(m[2 * lanes + lane], m[3 * lanes + lane]))
                    mx: T.float32 = m[0]
                    for lane in range(1, lanes):
                        mx = T.max(mx, m[lane])
                    for lane in T.vectorized(eacc * lanes):
                        s[lane] = T.float32(0)
                    for g in range(egroups):
                        for a in T.unroll(eacc):
                            for lane in T.vectorized(lanes):
                                y[r, (g * eacc + a) * lanes + lane] = _exp(
                                    x[r, (g * eacc + a) * lanes + lane] - mx)
                                s[a * lanes + lane] = s[a * lanes + lane] + y[
                                    r, (g * eacc + a) * lanes + lane]
                    for j in range(erest):
                        for lane in T.vectorized(lanes):
                            y[r, (egroups * eacc + j) * lanes + lane] = _exp(
                                x[r, (egroups * eacc + j) * lanes + lane] - mx)
                            s[lane] = s[lane] + y[r, (egroups * eacc + j) * lanes + lane]
                    if has_part:
                        for lane in T.vectorized(lanes):
                            y[r, nfull * lanes + lane] = T.Select(
                                lane < part, _exp(x[r, nfull * lanes + lane] - mx), T.float32(0))
                            s[lane] = s[lane] + y[r, nfull * lanes + lane]
                    for a in range(1, eacc):
                        for lane in T.vectorized(lanes):
                            s[lane] = s[lane] + s[a * lanes + lane]
                    total: T.float32 = s[0]
                    for lane in range(1, lanes):
                        total = total + s[lane]
                    scale: T.float32 = T.float32(1) / total
                    if check:
                        scale = T.Select(total < T.float32(0.5), T.float32(0), scale)
                    for j in range(written):
                        for lane in T.vectorized(lanes):
                            y[r, j * lanes + lane] = y[r, j * lanes + lane] * scale
                    for j in range(zero_tail):
                        for lane in T.vectorized(lanes):
                            y[r, (written + j) * lanes + lane] = T.float32(0)

    @T.prim_func(private=True)
    def func(x: T.Buffer((rows, n), "float32"), y: T.Buffer((rows, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        body(x, y)

    @T.prim_func(private=True)
    def func_inplace(x: T.Buffer((rows, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        body(x, x)

    func = func_inplace if inplace else func
    # Relax's analyses (``has_reshape_pattern``) expect a root block around the body; one made
    # in TVMScript's block mode turned the scratch rows into workspace allocations (3 alloc /
    # free calls per row), so the plain loop nest is wrapped here.
    from tvm import s_tir

    root = s_tir.SBlock([], [], [], "root", func.body)
    func = func.with_body(s_tir.SBlockRealize([], tirx.const(True, "bool"), root))
    # Opaque to FuseOps (nothing fuses into a hand-written loop nest); the rules skip it.
    return func.with_attr("op_pattern", 8).with_attr("tirx.is_scheduled", True)


def _op(expr) -> str:
    return getattr(getattr(expr, "op", None), "name", "") if isinstance(expr, relax.Call) else ""


def _is_scalar(expr, value: float) -> bool:
    if not isinstance(expr, tvm.ir.expr.Constant):
        return False
    data = expr.value.numpy()
    return data.size == 1 and float(data.reshape(-1)[0]) == value


#: Elementwise steps between ``Q @ K^T`` and the softmax that the padded keys go through (with
#: a scalar, or a mask over the keys, padded with zeros: whatever the padded columns hold is
#: masked by the softmax's selects).
_SCALAR_OPS = {"relax.multiply": relax.op.multiply, "relax.divide": relax.op.divide,
               "relax.add": relax.op.add, "relax.subtract": relax.op.subtract}


#: Ops whose result may share its input's memory (``RewriteDataflowReshape`` turns reshape-like
#: kernels into views): walked through by :meth:`_SafeSoftmax._fresh`.
_VIEW_OPS = ("relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten")
#: Calls whose result is not a tensor of their own (a tuple item, a call of another function,
#: an in-place call): never overwritten.
_ALIASING_OPS = ("relax.call_tir_inplace", "relax.memory.view", "relax.call_pure_packed",
                 "relax.call_packed", "relax.astype")


def _dims(shape) -> list[str]:
    return [str(d) for d in shape] if shape is not None else []


def _last_axis(axis, ndim: int) -> bool:
    if axis is None:
        return False
    axes = [int(a) for a in axis] if not isinstance(axis, int | tvm.tirx.IntImm) else [int(axis)]
    return len(axes) == 1 and axes[0] % ndim == ndim - 1


class _Plan(NamedTuple):
    """``P @ V`` whose ``P`` is a softmax of ``Q @ K^T``: what the padded chain is built from."""

    q: relax.Expr
    kt: relax.Expr
    v: relax.Expr
    steps: list  # from ``Q @ K^T`` to the softmax input: (op, (position, operand, pad it), shape)
    probs_shape: list  # the ``P @ V`` left operand's shape
    check: bool  # the safe softmax's all -inf row check
    keys: int
    padded: int


@expr_functor.mutator
class _SafeSoftmax(PyExprMutator):
    """``where(all(x == -inf), 0, softmax(x))`` -> :func:`safe_softmax`; ``softmax(Q @ K^T) @ V``
    with a key count that is not whole vectors -> the same with padded keys."""

    def __init__(self, mod, lanes: int) -> None:
        super().__init__(mod)
        self.lanes = lanes
        self.var2val: dict = {}
        self.uses: dict = {}
        self.plans: dict = {}
        self.guarded: set = set()

    def plan(self, func: relax.Function) -> None:
        """Find the ``P @ V`` matmuls to pad (on the original function, before rewriting)."""
        bindings = relax.analysis.get_var2val(func)
        self.var2val.update(bindings)
        uses = self.uses

        def count(expr) -> None:
            if isinstance(expr, relax.Call):
                for arg in expr.args:
                    if isinstance(arg, relax.Var):
                        uses[arg] = uses.get(arg, 0) + 1
            elif isinstance(expr, relax.Tuple):
                for f in expr.fields:
                    if isinstance(f, relax.Var):
                        uses[f] = uses.get(f, 0) + 1

        relax.analysis.post_order_visit(func.body, count)
        for value in bindings.values():
            if _op(value) == "relax.where":  # a safe softmax: rewritten with its check
                soft = self._value(value.args[2])
                if _op(soft) == "relax.nn.softmax":
                    self.guarded.add(soft)
            if _op(value) == "relax.matmul":
                plan = self._plan_matmul(value)
                if plan is not None:
                    self.plans[value] = plan

    def _bound(self, expr):
        return self.var2val.get(expr) if isinstance(expr, relax.Var) else None

    def _single(self, expr) -> bool:
        return self.uses.get(expr, 0) == 1

    def _plan_matmul(self, call: relax.Call) -> _Plan | None:
        plan = self.chain(call)
        if plan is None or plan.keys % self.lanes == 0:
            return None
        keys = plan.keys
        # Whole chunks of 4 vectors when that costs at most 1/8 more keys: 4 accumulators in
        # the softmax, and a ``P @ V`` inner length the matmul runs at full speed (Whisper:
        # 1504 keys ran ``P @ V`` 7-26% slower than 1500 or 1536, measured alone); else whole
        # vectors (ViT: 197 -> 208).
        padded = -(-keys // (4 * self.lanes)) * 4 * self.lanes
        if padded - keys > keys // 8:
            padded = -(-keys // self.lanes) * self.lanes
        if padded - keys > keys // 8:  # short rows: the padding would cost more than it saves
            return None
        return plan._replace(padded=padded)

    def chain(self, call: relax.Call) -> _Plan | None:
        """``call`` (a matmul) as ``softmax(steps(Q @ K^T)) @ V`` with constant shapes (its
        ``padded`` is the key count), else None."""
        probs, v = call.args
        if not (isinstance(probs, relax.Var) and self._single(probs)):
            return None
        probs_shape, v_shape = static_dims(probs.ty.shape or []), static_dims(v.ty.shape or [])
        if not probs_shape or not v_shape or len(v_shape) < 2:
            return None
        keys = probs_shape[-1]
        if v_shape[-2] != keys or str(probs.ty.dtype) != "float32":
            return None
        node = probs  # back through reshapes / broadcasts that keep the key axis last
        while _op(self._bound(node)) in ("relax.reshape", "relax.broadcast_to"):
            node = self._bound(node).args[0]
            if not self._single(node) or (static_dims(node.ty.shape or []) or [0])[-1] != keys:
                return None
        value, check = self._bound(node), False
        if _op(value) == "relax.where":
            cond, _, soft = value.args
            x = self._all_neg_inf_of(cond)
            value, check = self._bound(soft), True
            if x is None or _op(value) != "relax.nn.softmax" or not value.args[0].same_as(x):
                return None
        elif _op(value) != "relax.nn.softmax":
            return None
        scores = value.args[0]
        if not _last_axis(value.attrs.axis, scores.ty.ndim):
            return None
        node, steps = scores, []
        while True:  # back through reshapes and scalar scaling to ``Q @ K^T``
            shape = static_dims(node.ty.shape or [])
            if not shape or shape[-1] != keys or str(node.ty.dtype) != "float32":
                return None
            value = self._bound(node)
            if _op(value) == "relax.reshape":
                steps.append(("reshape", None, shape))
                node = value.args[0]
            elif _op(value) in _SCALAR_OPS:
                pos = next((i for i, a in enumerate(value.args)
                            if static_dims(a.ty.shape or []) == shape), None)
                other = value.args[1 - pos] if pos is not None else None
                other_shape = None if pos is None \
                    else static_dims(getattr(other.ty, "shape", None) or [])
                if other_shape is None or len(other_shape) > len(shape) or (
                        other_shape and other_shape[-1] not in (1, keys)):
                    return None
                # a scalar (scale) or a mask over the keys: padded too (its padding is masked)
                steps.append((_op(value), (pos, other, bool(other_shape) and other_shape[-1]
                                           == keys and keys > 1), shape))
                node = value.args[pos]
            else:
                break
        qk = self._bound(node)
        if _op(qk) != "relax.matmul":
            return None
        q, kt = qk.args
        kt_shape = static_dims(kt.ty.shape or [])
        if not kt_shape or len(kt_shape) < 2 or kt_shape[-1] != keys:
            return None
        return _Plan(q, kt, v, steps[::-1], probs_shape, check, keys, keys)

    def _value(self, expr):
        """The call bound to ``expr`` (through dataflow bindings), else ``expr``."""
        while isinstance(expr, relax.Var):
            bound = self.var2val.get(expr)
            if bound is None:
                return expr
            expr = bound
        return expr
    def _through(self, expr, ops: tuple[str, ...]):
        expr = self._value(expr)
        while _op(expr) in ops:
            expr = self._value(expr.args[0])
        return expr

    def _all_neg_inf_of(self, cond):
        """``x`` when ``cond`` is ``not(any(not(x == -inf), -1, keepdims))``, else None."""
        cond = self._value(cond)
        if _op(cond) != "relax.logical_not":
            return None
        red = self._through(cond.args[0], ("relax.astype",))
        if _op(red) not in ("relax.max", "relax.any") or not red.attrs.keepdims:
            return None
        inner = self._through(red.args[0], ("relax.astype",))
        if _op(inner) != "relax.logical_not":
            return None
        eq = self._value(inner.args[0])
        if _op(eq) != "relax.equal" or not _is_scalar(eq.args[1], float("-inf")):
            return None
        ndim = eq.args[0].ty.ndim
        return eq.args[0] if _last_axis(red.attrs.axis, ndim) else None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        plan = self.plans.get(call)
        if plan is not None:
            return self._padded(call, plan)
        if _op(call) == "relax.nn.softmax" and PLAIN_SOFTMAX_ROWS and call not in self.guarded:
            return self._plain_softmax(call)
        if _op(call) != "relax.where":
            return super().visit_call_(call)
        cond, zeros, soft = call.args
        soft_call = self._value(soft)
        fill = self._value(zeros)
        x = self._all_neg_inf_of(cond)
        if (x is None or _op(soft_call) != "relax.nn.softmax" or not soft_call.args[0].same_as(x)
                or _op(fill) != "relax.full_like" or not _is_scalar(fill.args[1], 0.0)):
            return super().visit_call_(call)
        info = x.ty
        if str(info.dtype) != "float32" or not _last_axis(soft_call.attrs.axis, info.ndim):
            return super().visit_call_(call)
        if info.shape is None or _dims(call.ty.shape) != _dims(info.shape):
            return super().visit_call_(call)  # a broadcasting where: leave it
        return self._softmax(self.visit_expr(x), None, True, "safe_softmax",
                             inplace=self._fresh(x, 2))  # read by the softmax and the check

    def _plain_softmax(self, call: relax.Call) -> relax.Expr:
        """A softmax with no all ``-inf`` check (eager attention: ``softmax(q @ k^T / s)``)
        over whole-vector rows of a constant shape: the row kernel too (MobileViT's 16 x 256
        rows of 256 keys ran TVM's ``fast_softmax``, its TE version)."""
        x = call.args[0]
        info = x.ty
        shape = static_dims(getattr(info, "shape", None) or [])
        if not shape or str(info.dtype) != "float32" or shape[-1] % self.lanes \
                or shape[-1] < PLAIN_SOFTMAX_MIN_VECTORS * self.lanes \
                or not _last_axis(call.attrs.axis, len(shape)):
            return super().visit_call_(call)
        return self._softmax(self.visit_expr(x), None, False, "softmax",
                             inplace=self._fresh(x, 1))

    def _fresh(self, x: relax.Expr, readers: int) -> bool:
        """Whether ``x`` may be overwritten by its softmax: bound to an op's result (not a
        parameter, constant or a view of one) that only ``readers`` uses read (through
        reshapes, which become views of their input, each read once); dataflow variables
        only, which nothing outside their block sees."""
        if not isinstance(x, relax.DataflowVar) or self.uses.get(x, 0) != readers:
            return False
        value = self.var2val.get(x)
        while _op(value) in _VIEW_OPS:
            arg = value.args[0]
            if not isinstance(arg, relax.DataflowVar) or self.uses.get(arg, 0) != 1:
                return False
            value = self.var2val.get(arg)
        return isinstance(value, relax.Call) and _op(value) != "" and \
            _op(value) not in _ALIASING_OPS and self._reads_an_input(value)

    def _reads_an_input(self, expr: relax.Expr) -> bool:
        """Whether ``expr`` depends on a function parameter: one computed from constants alone
        becomes a constant (``FoldConstant``), which an in-place kernel would overwrite."""
        stack, seen = [expr], set()
        while stack:
            node = stack.pop()
            if isinstance(node, relax.Var):
                bound = self.var2val.get(node)
                if bound is None:
                    return True  # a parameter
                node = bound
            if isinstance(node, relax.Call):
                for arg in node.args:
                    if isinstance(arg, relax.Var | relax.Call | relax.Tuple) and arg not in seen:
                        seen.add(arg)
                        stack.append(arg)
            elif isinstance(node, relax.Tuple):
                stack.extend(f for f in node.fields if f not in seen)
                seen.update(node.fields)
            elif isinstance(node, relax.TupleGetItem):
                stack.append(node.tuple_value)
        return False

    def _softmax(self, x: relax.Expr, valid: int | None, check: bool, name: str,
                 inplace: bool = False) -> relax.Expr:
        """Softmax of ``x`` over its last axis: the row kernel when ``x``'s shape is constant
        and its rows whole vectors, else the TE version (scheduled by ``RowReduction``).
        ``inplace``: ``x`` is a fresh tensor nothing else reads, the row kernel overwrites it
        (see :data:`INPLACE`)."""
        bb = self.builder_
        shape = static_dims(x.ty.shape or [])
        if ROW_KERNEL and shape and shape[-1] % self.lanes == 0 and str(x.ty.dtype) == "float32":
            n = shape[-1]
            rows = 1
            for d in shape[:-1]:
                rows *= d
            inplace = inplace and INPLACE
            func = softmax_rows(rows, n, n if valid is None else valid, check, self.lanes,
                                inplace=inplace)
            gvar = bb.add_func(func, f"{name}_rows")
            flat = bb.emit(relax.op.reshape(x, [rows, n]))
            out_ty = relax.TensorType((rows, n), "float32")
            call = relax.call_tir_inplace(gvar, [flat], 0, out_ty) if inplace \
                else relax.call_tir(gvar, [flat], out_ty)
            return relax.op.reshape(bb.emit(call), shape)
        return bb.call_te(safe_softmax, x, valid=valid, check=check, primfunc_name_hint=name)

    def _padded(self, call: relax.Call, plan: _Plan) -> relax.Expr:
        """``P @ V`` rebuilt with ``K^T`` and ``V`` padded to whole vectors of keys."""
        bb, extra = self.builder_, plan.padded - plan.keys
        kt, v = self.visit_expr(plan.kt), self.visit_expr(plan.v)
        kt = bb.emit(_pad_last(kt, -1, extra, kt.ty.ndim))
        scores = bb.emit(relax.op.matmul(self.visit_expr(plan.q), kt,
                                         out_dtype=call.attrs.out_dtype))
        for op, operand, shape in plan.steps:
            if op == "reshape":
                scores = bb.emit(relax.op.reshape(scores, [*shape[:-1], plan.padded]))
            else:
                pos, other, pad_other = operand
                other = self.visit_expr(other)
                if pad_other:
                    other = bb.emit(_pad_last(other, -1, extra, other.ty.ndim))
                args = (scores, other) if pos == 0 else (other, scores)
                scores = bb.emit(_SCALAR_OPS[op](*args))
        probs = bb.emit(self._softmax(scores, plan.keys, plan.check,
                                      "safe_softmax" if plan.check else "padded_softmax",
                                      inplace=True))  # the scores built here: fresh
        probs = bb.emit(relax.op.reshape(probs, [*plan.probs_shape[:-1], plan.padded]))
        v = bb.emit(_pad_last(v, -2, extra, v.ty.ndim))
        return relax.op.matmul(probs, v, out_dtype=call.attrs.out_dtype)


def _pad_last(expr, axis: int, extra: int, ndim: int):
    width = [0] * (2 * ndim)
    width[2 * (axis % ndim) + 1] = extra
    return relax.op.nn.pad(expr, width, pad_value=0.0)


#: False turns the pass off: TVM's softmax + all -inf row check as imported, for A/B benchmarks.
ENABLED = True
#: The row kernel writes the probabilities over the scores when nothing else reads them
#: (``call_tir_inplace``): no second ``heads x L x L`` buffer, whose first write misses the
#: caches (see the module docstring). False always writes a new tensor, for A/B benchmarks.
INPLACE = True
#: False keeps the TE softmax (``RowReduction``) where the row kernel would run, for A/B
#: benchmarks (``benchmarks/attention_softmax.py --no-row-kernel``).
ROW_KERNEL = True
#: Plain softmaxes (no safe-softmax check) over whole-vector rows run the row kernel too
#: (:meth:`_SafeSoftmax._plain_softmax`); False keeps TVM's softmax, for A/B benchmarks.
PLAIN_SOFTMAX_ROWS = True
#: ... of at least this many vectors. Alone, 2 threads, through bench.sh (medians, loaded
#: host): 4 x 4 x 256 rows of 256 keys 320 vs 507 us (TE), 8 x 256 of 256 221 vs 485; but
#: 128 keys 111 vs 109, 64 keys 53-55 vs 38-40, 16 keys 12.8 vs 11.8: short rows keep TE's.
PLAIN_SOFTMAX_MIN_VECTORS = 16


def fuse_safe_softmax(target) -> tvm.transform.Pass:
    """The Relax pass (before ``fast_math``): see the module docstring."""

    @tvm.transform.module_pass(opt_level=0, name="SlimcSafeSoftmax")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not ENABLED:
            return mod
        mutator = _SafeSoftmax(mod, vector_lanes(target, 32))
        for _, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.plan(func)
        # (a softmax rewritten before its ``P @ V`` plan or ``where`` replaced it is dead)
        return relax.transform.DeadCodeElimination()(mutate_relax_functions(mod, mutator))

    return _pass
