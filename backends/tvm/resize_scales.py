"""``F.interpolate(..., scale_factor=s)`` with PyTorch's coordinates.

PyTorch maps an output pixel back to the input with the *given* scale (``src = dst / s``,
half-pixel for linear/cubic), while TVM 0.27's importer turns ``upsample_*2d.vec`` into
``resize2d`` to ``int(in * s)`` pixels, whose coordinates use the ratio ``in / out``. The two
agree when ``in * s`` is a whole number; otherwise (``scale_factor=1.5`` on 5 pixels: out 7,
PyTorch steps 1/1.5, TVM 5/7) every pixel reads the wrong place (rel. L2 0.7, refused by the
build-time check). TVM also ignores ``antialias=True`` (``_upsample_bilinear2d_aa``).

These cases are lowered exactly: the resize is separable, so each axis's interpolation matrix
is computed by running the ATen op itself on a one-hot basis (static sizes), and the resize
becomes ``A_h @ x @ A_w^T`` -- or, for nearest modes, two ``take``s of the chosen rows, which
copy values (``inf``/``nan`` stay where they were, ``0 * inf`` never appears). Every other
case keeps TVM's ``resize2d``.
"""

from __future__ import annotations

from typing import Any

#: ATen op (without overload) -> (TVM's converter of its ``.vec`` overload, whether args[2]
#: is align_corners, nearest?). Both overloads are converted here: ``.vec`` (what export
#: writes: one list of scales) and ``.default`` (after decomposition: ``scales_h, scales_w``).
_OPS = {
    "upsample_nearest2d": ("_upsample_nearest2d", False, True),
    "_upsample_nearest_exact2d": (None, False, True),
    "upsample_bilinear2d": ("_upsample_bilinear2d", True, False),
    "upsample_bicubic2d": ("_upsample_bicubic2d", True, False),
    "_upsample_bilinear2d_aa": (None, True, False),
    "_upsample_bicubic2d_aa": (None, True, False),
}


def _static(dims) -> list[int] | None:
    try:
        return [int(d) for d in dims]
    except (TypeError, ValueError):  # a symbolic dimension
        return None


def _axis_matrix(op, length: int, scale: float | None, out: int, align: bool | None):
    """``(out, length)`` float64 matrix of the op along one axis. The basis is a batch of
    one-hot columns, two pixels wide and kept at two (a width of one made the antialiased
    kernels return wrong weights)."""
    import torch

    basis = torch.eye(length, dtype=torch.float64).reshape(length, 1, length, 1)
    basis = basis.expand(length, 1, length, 2).contiguous()
    args: list = [basis, [out, 2] if scale is None else None]
    if align is not None:
        args.append(align)
    args.append(None if scale is None else [float(scale), 1.0])
    y = op(*args)  # (length, 1, out, 2): batch c is the response to input pixel c
    if tuple(y.shape) != (length, 1, out, 2):
        raise AssertionError(f"resize matrix {tuple(y.shape)} for {out} pixels")
    return y[:, 0, :, 0].T.contiguous()


def _scales(node, name: str, overload: str) -> list[float | None]:
    """The (h, w) scale factors the node was given, ``None`` where it gave a size."""
    first = 3 if _OPS[name][1] else 2
    rest = list(node.args[first:])
    if overload == "vec":
        given = rest[0] if rest else node.kwargs.get("scale_factors")
        if given is None:
            return [None, None]
        return list(given) if isinstance(given, (list, tuple)) else [given, given]
    rest += [node.kwargs.get(k) for k in ("scales_h", "scales_w")[len(rest):]]
    return [None if v is None else float(v) for v in rest[:2]]


def _convert(name: str, overload: str):
    tvm_name, has_align, nearest = _OPS[name]
    if overload != "vec":
        tvm_name = None  # TVM has no converter for these, or (aa) ignores the antialiasing

    def convert(node, importer) -> Any:
        import numpy as np
        import torch
        from tvm import relax

        x = importer.env[node.args[0]]
        dims = list(importer.shape_of(x))
        value = node.meta.get("val")
        # only the two resized axes must be static (a symbolic batch is fine)
        shape = _static(dims[2:]) if len(dims) == 4 else None
        out_shape = _static(value.shape[2:]) if value is not None and len(dims) == 4 else None
        scales = _scales(node, name, overload)
        static = shape is not None and out_shape is not None
        exact = static and (tvm_name is None or any(  # TVM's coordinates differ from torch's
            s is not None and n * float(s) != o
            for n, s, o in zip(shape, scales, out_shape, strict=True)))
        if not exact:
            if tvm_name is None:
                raise AssertionError(f"Unsupported function types ['{name}.{overload} "
                                     "(dynamic size)']")
            return getattr(importer, tvm_name)(node)
        op = getattr(torch.ops.aten, name).vec
        align = bool(node.args[2]) if has_align else None
        a_h, a_w = (_axis_matrix(op, n, s, o, align).numpy()
                    for n, s, o in zip(shape, scales, out_shape, strict=True))
        emit = importer.block_builder.emit
        dtype = str(x.ty.dtype)
        if nearest:
            for axis, a in ((3, a_w), (2, a_h)):
                rows = relax.const(a.argmax(1).astype("int64"), "int64")
                x = emit(relax.op.take(x, rows, axis))
            return x
        x = emit(relax.op.matmul(x, relax.const(np.ascontiguousarray(a_w.T).astype(dtype))))
        return emit(relax.op.matmul(relax.const(a_h.astype(dtype)), x))

    return convert


def converters() -> dict[str, Any]:
    """Converters keyed like TVM's ``custom_convert_map``."""
    return {f"{name}.{overload}": _convert(name, overload)
            for name in _OPS for overload in ("vec", "default")}
