"""CPU lowering of ``slimc::coded_scale``: a ``-qs`` grid's fp16 steps / minimums rebuilt from
their codes at run time (:mod:`slimc.coded_scales`): 8-bit codes ``[N, G]``, or narrower ones
(``-qs5``) bit-packed row-major in one ``uint8`` vector.

The rebuilt ``[N, G]`` tensor feeds the existing float-zero kernels (int4 linear and gather,
int3/int2), unchanged. The kernel also takes the consumer's run-time input (``like``) and never
reads it: with every operand constant, ``FoldConstant`` would evaluate the rebuild at build time
and store fp16 grids again (the bytes test in ``tests/test_quantized_scales.py`` checks it
does not).
"""

from __future__ import annotations

import functools

from slimc.dialect import register_lowering

from .quantized_ops import _static_shape, add_kernel


@functools.lru_cache(maxsize=64)
def coded_scale_kernel(n: int, groups: int, code_dtype: str, like_ndim: int, like_dtype: str):
    """``out[n, g] = fp16(float(code[n, g]) * float(unit[n]))``; ``like`` (any shape) unread."""
    from tvm import te, tirx

    code = te.placeholder((n, groups), code_dtype, name="code")
    unit = te.placeholder((n,), "float16", name="unit")
    like = te.placeholder([tirx.Var(f"d{i}", "int64") for i in range(like_ndim)], like_dtype,
                          name="like")
    out = te.compute((n, groups), lambda i, g: (
        code[i, g].astype("float32") * unit[i].astype("float32")).astype("float16"),
        name="coded_scale")
    func = te.create_prim_func([code, unit, like, out], "int64")
    return func.with_attr("global_symbol", f"slimc_coded_scale_{n}x{groups}_{code_dtype}")


@functools.lru_cache(maxsize=64)
def packed_coded_scale_kernel(n: int, groups: int, bits: int, signed: bool, like_ndim: int,
                              like_dtype: str):
    """The rebuild from ``bits``-bit codes packed by :func:`slimc.coded_scales.pack_codes`:
    code ``(i, g)`` starts at bit ``(i * groups + g) * bits`` of the stream; a code read from
    two bytes (the second clamped to the stream, as the lowbit gather does), minus the bias
    ``2^(bits-1)-1`` for ``signed`` (minimum) codes."""
    from tvm import te, tirx

    from slimc.coded_scales import levels

    width = -(-n * groups * bits // 8)
    code = te.placeholder((width,), "uint8", name="code")
    unit = te.placeholder((n,), "float16", name="unit")
    like = te.placeholder([tirx.Var(f"d{i}", "int64") for i in range(like_ndim)], like_dtype,
                          name="like")

    def value(i, g):
        bit = (i * groups + g) * bits
        p = bit // 8
        low = code[p].astype("uint16")
        high = code[tirx.min(p + 1, width - 1)].astype("uint16")
        word = low | (high << tirx.const(8, "uint16"))
        c = ((word >> (bit % 8).astype("uint16")) & tirx.const((1 << bits) - 1, "uint16"))
        c = c.astype("float32")
        if signed:
            c = c - tirx.const(float(levels(bits)[1]), "float32")
        return (c * unit[i].astype("float32")).astype("float16")

    out = te.compute((n, groups), value, name="coded_scale")
    func = te.create_prim_func([code, unit, like, out], "int64")
    kind = "m" if signed else "s"
    return func.with_attr("global_symbol", f"slimc_coded_scale_{n}x{groups}_b{bits}{kind}")


def packed_args(node) -> tuple[int, int, bool]:
    """``(bits, groups, signed)`` of a ``coded_scale`` node; export drops arguments equal to
    their defaults (``signed=False``), so those are read back as the defaults."""
    names, defaults = ("bits", "groups", "signed"), (8, 0, False)
    args = list(node.args[3:]) + [None] * 3
    values = [node.kwargs.get(name, default) if args[i] is None else args[i]
              for i, (name, default) in enumerate(zip(names, defaults, strict=True))]
    return int(values[0]), int(values[1]), bool(values[2])


def _convert(node, importer):
    from tvm import relax

    bb = importer.block_builder
    code, unit, like = (importer.env[a] for a in node.args[:3])
    bits, groups, signed = packed_args(node)
    if bits < 8:
        n = _static_shape(unit)[0]
        func = packed_coded_scale_kernel(n, groups, bits, signed, len(like.ty.shape),
                                         str(like.ty.dtype))
    else:
        n, groups = _static_shape(code)
        func = coded_scale_kernel(n, groups, str(code.ty.dtype), len(like.ty.shape),
                                  str(like.ty.dtype))
    gvar = add_kernel(bb, func)
    return bb.emit(relax.call_tir(gvar, [code, unit, like],
                                  relax.TensorType((n, groups), "float16")))


register_lowering("coded_scale", "cpu", _convert)
