"""Move a ``reshape`` from before an activation to after it, so the activation fuses into
the matmul that produced its input.

``nn.Linear`` on a ``(batch, tokens, features)`` tensor is exported as a 2-D matmul between two
reshapes: ``reshape -> matmul + bias -> reshape``, then the activation. Operator fusion puts an
elementwise op into a matmul's epilogue only when it follows the matmul directly; the
``reshape`` (injective, not elementwise) in between cut the transformer MLPs into a matmul
kernel and a separate GELU kernel, one more full pass over the widest activation of the layer
(ViT-Small: 197 x 1536 per block). An activation works elementwise, so
``act(reshape(y)) == reshape(act(y))``; the reshape left after the activation is a free view at
run time (``RewriteDataflowReshape``).

The same cut kept every residual connection in a kernel of its own: ``x + linear(h)`` is
``add(reshape(matmul + bias), x)``, one more read of the matmul's output and of ``x`` and one
more write per ``out_proj``/``fc2`` (Whisper-tiny: ``fused_reshape1_add4``, 2.7% of the
encoder). An add of two tensors *of the same shape* is elementwise too:
``reshape(y) + x == reshape(y + reshape(x, shape(y)))``, where ``reshape(x, shape(y))`` is again
a view, so the residual add joins the matmul's epilogue. An add that broadcasts (a bias, a mask)
is left alone: reshaping its other operand would change which elements pair up.

Hard-swish (LeViT, MobileNetV3 heads), decomposed by TVM's importer as
``x * clip(x + 3, 0, 6) / 6``, reads its input twice, so it is sunk as a whole
(:func:`_sink_into_hardswish`) when those two reads are the reshape's only uses. Every sink
here builds new calls on the reshape's source; none replaces a call by an existing variable
(``reshape(y, shape(y)) -> y`` did, in the reverted lv16 change: a Relax var bound to another
var, which ``FuseTIR`` rejects as "Inconsistent buffers ... mapped to the same relax var" in
quantized models). LeViT's round trips ``flatten(linear(x)).reshape_as(..)`` are dropped on the
FX graph instead (``passes/quantize/batchnorm.py``).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from .relax_uses import variable_uses

#: Also sink a reshape past a division / multiplication by a scalar constant
#: (:func:`_sink_into_scalar_ops`; off only to measure what it saves).
SINK_SCALAR_OPS = True
#: Unary elementwise activations (Relax op names) that commute with a reshape.
ACTIVATIONS = ("relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.relu", "relax.nn.silu",
               "relax.sigmoid", "relax.tanh")


def _reshape_uses(func: relax.Function) -> dict:
    """Uses of each ``reshape`` call of ``func`` whose source is a matmul (:func:`_from_matmul`),
    keyed by :func:`id_of` the call."""
    uses = variable_uses(func)
    reshapes = {}
    values = {}
    for block in getattr(func.body, "blocks", []):
        for binding in block.bindings:
            value = binding.value
            values[binding.var] = value
            if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.reshape":
                reshapes[binding.var] = value
    return {id_of(call): uses.get(var, 0) for var, call in reshapes.items()
            if _from_matmul(call.args[0], values)}


def _single_use_reshapes(func: relax.Function) -> set:
    """The ``reshape`` calls of ``func`` whose result is used exactly once.

    Only a reshape of a matmul's result (:func:`_from_matmul`) is moved. A reshape with
    other users stays where it is: sinking it would leave the tensor both
    reshaped and not for one fused kernel, which ``FuseTIR`` rejects (W8A8 BERT on aarch64:
    "Inconsistent buffers ... mapped to the same relax var").
    """
    return {key for key, n in _reshape_uses(func).items() if n == 1}


def _from_matmul(expr, values: dict) -> bool:
    """Whether ``expr`` is a float ``matmul``, a matmul plus a bias, or an activation of either
    (once sunk): the producers the CPU matmul rule fuses an epilogue into. Quantized matmuls
    (their own kernels, whose fusion ``FuseTIR`` rejected with the reshape moved) are left
    alone."""
    value = values.get(expr)
    if not isinstance(value, relax.Call):
        return False
    name = getattr(value.op, "name", "")
    if name == "relax.matmul":
        return True
    if name in ACTIVATIONS:  # sunk already: the residual add after ``act(linear(x))``
        return _from_matmul(value.args[0], values)
    if name in SCALAR_OPS:  # sunk already: attention's bias add after the scaled ``q @ k^T``
        return any(_from_matmul(arg, values) for arg in value.args
                   if not isinstance(arg, tvm.ir.expr.Constant))
    return name == "relax.add" and any(
        isinstance(values.get(arg), relax.Call)
        and getattr(values[arg].op, "name", "") == "relax.matmul" for arg in value.args)


def id_of(expr) -> int:
    """A key for a Relax node that survives re-wrapping in Python (its C++ handle)."""
    return expr.__hash__()


def _static_shape(expr) -> tuple | None:
    """``expr``'s shape and dtype when its struct info gives them, else None."""
    info = getattr(expr, "ty", None)
    shape = getattr(info, "shape", None)
    if not isinstance(shape, relax.ShapeExpr) or getattr(info, "dtype", None) is None:
        return None
    return tuple(shape.values), str(info.dtype)


def _same_shape(a, b) -> bool:
    """Whether two tensors provably have the same shape and dtype (dims compared
    structurally, so symbolic dims must be the same variables)."""
    sa, sb = _static_shape(a), _static_shape(b)
    if sa is None or sb is None or sa[1] != sb[1] or len(sa[0]) != len(sb[0]):
        return False
    from tvm.sym import Analyzer

    analyzer = Analyzer()
    return all(analyzer.can_prove_equal(x, y) for x, y in zip(sa[0], sb[0], strict=True))


#: Also sink an add whose other operand only lacks unit dims (:func:`_same_elements`). Off:
#: on LeViT-128S it moved the attention bias-table adds into the score matmuls' epilogues, and
#: back to back (``kernel_ab.py``) the stage-1 score kernel ``[8, 49, 16] @ [8, 16, 49] + bias``
#: went from 0.18 + 0.05 (separate add) to 0.88 ms per inference, the stage-0 one from 0.24 +
#: 0.41 to 0.78 ms: the tiled-matmul epilogue reading a third full-size operand is slower
#: than a separate add kernel there (not investigated further; see docs/benchmarks.md, lv18).
SINK_SAME_ELEMENT_ADDS = False


def _same_elements(residual, out) -> bool:
    """Whether ``residual``, broadcast to ``out``'s static shape, is its own data in the same
    order: it has as many elements (so it only lacks leading dims or has 1s where ``out`` has
    1s; LeViT's attention bias table ``[heads, n, n]`` added to ``[1, heads, n, n]`` scores)."""
    sr, so = _static_shape(residual), _static_shape(out)
    if sr is None or so is None or sr[1] != so[1] or len(sr[0]) > len(so[0]):
        return False
    if not all(isinstance(d, tvm.tirx.IntImm) for d in (*sr[0], *so[0])):
        return _same_shape(residual, out)
    count = 1
    for d in sr[0]:
        count *= int(d)
    total = 1
    for d in so[0]:
        total *= int(d)
    return count == total


def _sink_into_adds(func: relax.Function, single: set, reshape, source) -> relax.Function:
    """``add(reshape(y), x)`` (either order) with ``x`` of the reshape's shape, or of as many
    elements (:func:`_same_elements`) -> ``reshape(add(y, reshape(x, shape(y))), shape(x))``."""
    other = wildcard()
    for left in (True, False):
        pattern = is_op("relax.add")(*((reshape, other) if left else (other, reshape)))

        def sink(call, matches, left=left):
            moved, residual, inner = matches[reshape], matches[other], matches[source]
            fits = _same_elements(residual, moved) if SINK_SAME_ELEMENT_ADDS \
                else _same_shape(call, residual) and _same_shape(moved, residual)
            if id_of(moved) not in single or not _same_shape(call, moved) or not fits \
                    or _static_shape(inner) is None \
                    or _static_shape(inner)[1] != _static_shape(residual)[1]:
                return call
            view = relax.op.reshape(residual, inner.ty.shape)
            add = relax.op.add(inner, view) if left else relax.op.add(view, inner)
            return relax.op.reshape(add, moved.args[1])

        func = rewrite_call(pattern, sink, func)
    return func


#: Binary elementwise ops that commute with a reshape when the other operand is a scalar.
SCALAR_OPS = ("relax.divide", "relax.multiply")


def _is_scalar_constant(expr, inner) -> bool:
    """Whether ``expr`` is a constant of one element that broadcasts against ``inner``
    without changing its shape (rank 0, or all-ones dims no more than ``inner``'s rank)."""
    if not isinstance(expr, tvm.ir.expr.Constant):
        return False
    data = expr.value.numpy()
    target = _static_shape(inner)
    return data.size == 1 and target is not None and data.ndim <= len(target[0]) \
        and str(data.dtype) == target[1]


def _sink_into_scalar_ops(func: relax.Function, single: set, reshape, source) -> relax.Function:
    """``divide(reshape(y), c)`` / ``multiply(reshape(y), c)`` (either order for multiply)
    with a scalar constant ``c`` -> ``reshape(op(y, c))``.

    Why: eager attention scales its scores after the head reshape (HF MobileViT:
    ``matmul(q, k^T)`` is ``[b*h, n, n]``, viewed as ``[b, h, n, n]``, then ``/ sqrt(d)``),
    and the reshape between the matmul and the division kept the scaling in a kernel of its
    own: one more read and write of the widest tensor of the layer (16 x 256 x 256 scores).
    A scalar pairs with every element the same way before and after the reshape."""
    const = wildcard()
    for name in SCALAR_OPS:
        for left in ((True, False) if name == "relax.multiply" else (True,)):
            pattern = is_op(name)(*((reshape, const) if left else (const, reshape)))

            def sink(call, matches, left=left):
                moved, scalar, inner = matches[reshape], matches[const], matches[source]
                if id_of(moved) not in single or not _is_scalar_constant(scalar, inner):
                    return call
                args = [inner, scalar] if left else [scalar, inner]
                return relax.op.reshape(relax.Call(call.op, args, call.attrs), moved.args[1])

            func = rewrite_call(pattern, sink, func)
    return func


#: Sink hard-swish into the matmul epilogue (:func:`_sink_into_hardswish`; off only to measure
#: what it saves).
SINK_HARDSWISH = True


def _collapse_reshape_chains(func: relax.Function) -> relax.Function:
    """``reshape(reshape(y, s1), s2)`` -> ``reshape(y, s2)`` (row-major reshapes compose). The
    result is always a new reshape call, even when ``s2`` is ``y``'s own shape: replacing it by
    ``y`` itself would bind one var to another (see the module docstring). The inner reshape
    stays for any other user it has."""
    source, first, second = wildcard(), wildcard(), wildcard()
    pattern = is_op("relax.reshape")(is_op("relax.reshape")(source, first), second)
    return rewrite_call(pattern, lambda call, m: relax.op.reshape(m[source], m[second]), func)


def _sink_into_hardswish(func: relax.Function, reshape, source) -> relax.Function:
    """``r * clip(r + 3, 0, 6) / 6`` (one clip or a min and a max clip; either order of the
    multiply) with ``r = reshape(y)`` used by nothing else -> ``reshape(y * clip(y + 3) / 6)``:
    the same ops on ``y``, so they join the matmul's epilogue. Which scalars and bounds it uses
    is not checked: every op of the pattern is elementwise with scalar operands, so it commutes
    with the reshape whatever they are."""
    uses = _reshape_uses(func)
    for clips in (2, 1):
        for left in (True, False):
            c3, c6 = wildcard(), wildcard()
            bounds = [is_op("relax.clip")(is_op("relax.add")(reshape, c3), wildcard(), wildcard())]
            if clips == 2:
                bounds.append(is_op("relax.clip")(bounds[0], wildcard(), wildcard()))
            product = is_op("relax.multiply")(*((reshape, bounds[-1]) if left
                                                else (bounds[-1], reshape)))
            pattern = is_op("relax.divide")(product, c6)

            def sink(call, m, bounds=bounds, left=left, c3=c3, c6=c6):
                # the matched values are rebuilt on the reshape's source; the call's own args
                # are variables bound to them
                moved, inner = m[reshape], m[source]
                if uses.get(id_of(moved)) != 2 or not _is_scalar_constant(m[c3], inner) \
                        or not _is_scalar_constant(m[c6], inner):
                    return call
                y = relax.op.add(inner, m[c3])
                for bound in bounds:
                    clip = m[bound]
                    y = relax.Call(clip.op, [y, *clip.args[1:]], clip.attrs)
                y = relax.op.multiply(inner, y) if left else relax.op.multiply(y, inner)
                return relax.op.reshape(relax.op.divide(y, m[c6]), moved.args[1])

            func = rewrite_call(pattern, sink, func)
    return func


def _rewrite(func: relax.Function) -> relax.Function:
    single = _single_use_reshapes(func)
    source, shape = wildcard(), wildcard()
    reshape = is_op("relax.reshape")(source, shape)
    for name in ACTIVATIONS:
        pattern = is_op(name)(reshape)

        def sink(call, matches, pattern=pattern):
            if id_of(matches[reshape]) not in single:
                return call
            inner = matches[source]
            act = relax.Call(call.op, [inner], call.attrs)
            return relax.op.reshape(act, matches[reshape].args[1])

        func = rewrite_call(pattern, sink, func)
    if SINK_HARDSWISH:
        func = _collapse_reshape_chains(_sink_into_hardswish(func, reshape, source))
    if SINK_SCALAR_OPS:
        func = _sink_into_scalar_ops(func, _single_use_reshapes(func), reshape, source)
    # after the activations: their sunk reshapes are new nodes, counted again
    return _sink_into_adds(func, _single_use_reshapes(func), reshape, source)


@tvm.transform.module_pass(opt_level=0, name="SlimcSinkReshapes")
def sink_reshapes(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Rewrite ``act(reshape(y))`` as ``reshape(act(y))`` in every Relax function of ``mod``."""
    updates = {gv: _rewrite(f) for gv, f in mod.functions_items()
               if isinstance(f, relax.Function)}
    if not updates:
        return mod
    mod = mod.shallow_copy() if hasattr(mod, "shallow_copy") else mod
    for gv, f in updates.items():
        mod[gv] = f
    return mod
