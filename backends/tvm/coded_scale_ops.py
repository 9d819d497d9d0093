"""CPU lowering of ``slimc::coded_scale``: a ``-qs`` grid's fp16 steps / minimums rebuilt from
their 8-bit codes at run time (:mod:`slimc.coded_scales`).

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


def _convert(node, importer):
    from tvm import relax

    bb = importer.block_builder
    code, unit, like = (importer.env[a] for a in node.args[:3])
    n, groups = _static_shape(code)
    func = coded_scale_kernel(n, groups, str(code.ty.dtype), len(like.ty.shape),
                              str(like.ty.dtype))
    gvar = add_kernel(bb, func)
    return bb.emit(relax.call_tir(gvar, [code, unit, like],
                                  relax.TensorType((n, groups), "float16")))


register_lowering("coded_scale", "cpu", _convert)
