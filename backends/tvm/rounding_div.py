"""``torch.div(a, b, rounding_mode=...)`` with PyTorch's dtypes and rounding.

TVM 0.27's converter for ``div.Tensor_mode`` turns a Python-number divisor into
``relax.const(b)`` -- an int32 or float32 constant whatever the tensor's dtype -- so an
int64 tensor divided by an int (``torch.div(pos, 2, rounding_mode="floor")``, relative
position buckets, ``index // 2``) was refused ("Binary operators must have the same
datatype"), and ``rounding_mode="trunc"`` on integers applied a float ``trunc`` to an
integer quotient. Here both operands are cast to the dtype torch computed for the node,
``floor`` is ``floor_divide`` and ``trunc`` on integers is ``|a| // |b|`` with the sign of
``a * b`` (the quotient rounded toward zero, as C and PyTorch do).
"""

from __future__ import annotations


def convert_div_mode(node, importer):
    """``aten.div.Tensor_mode`` / ``div.Scalar_mode``."""
    from tvm import relax

    value = node.meta.get("val")
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("rounding_mode")
    if value is None or mode not in ("floor", "trunc"):
        return importer._div(node)
    dtype = str(value.dtype).replace("torch.", "")
    emit = importer.block_builder.emit

    def operand(arg):
        if not isinstance(arg, relax.Expr):
            return relax.const(arg, dtype)
        return arg if str(arg.ty.dtype) == dtype else emit(relax.op.astype(arg, dtype))

    a, b = (operand(importer.env[x] if hasattr(x, "meta") else x) for x in node.args[:2])
    if mode == "floor":
        return emit(relax.op.floor_divide(a, b))
    if value.is_floating_point():
        return emit(relax.op.trunc(emit(relax.op.divide(a, b))))
    magnitude = emit(relax.op.floor_divide(emit(relax.op.abs(a)), emit(relax.op.abs(b))))
    sign = emit(relax.op.multiply(emit(relax.op.sign(a)), emit(relax.op.sign(b))))
    return emit(relax.op.multiply(magnitude, sign))
