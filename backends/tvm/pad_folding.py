"""Zero ``pad`` ops folded into the padding of the convolution they feed.

Hugging Face's MobileNetV2 (and every TF-ported "same"-padded CNN) pads explicitly -- one
pixel bottom/right before each stride-2 depthwise conv -- and convolves with ``padding=0``.
On GPU targets that pad fused into the *previous* conv's epilogue as a write of a larger
tensor, which dlight's Matmul rule cannot schedule: those convs fell to generic rules and
MobileNetV2 at batch 8 ran at 0.52x PyTorch eager on an H200, 18 of its 25 ms in them
(``benchmarks/results/gpu26/run2_trace.json``). A conv's own padding is asymmetric in Relax
(top, left, bottom, right), so ``conv2d(pad(x), padding=p)`` is ``conv2d(x, padding=p + pad)``:
no pad kernel, no epilogue the rule cannot take.
"""

from __future__ import annotations


def fold_pads_into_convs(mod):
    """``mod`` with every constant-zero spatial ``pad`` before an NCHW ``conv2d`` moved into
    the conv's padding."""
    from tvm import relax

    from .schedules.common import mutate_relax_functions

    @relax.expr_functor.mutator
    class FoldPads(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: D102 - visitor hook
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != "relax.nn.conv2d" or \
                    str(call.attrs.data_layout) != "NCHW":
                return call
            data = call.args[0]
            pad = self.lookup_binding(data) if isinstance(data, relax.Var) else None
            extra = _spatial_zero_pad(pad)
            if extra is None:
                return call
            top, left, bottom, right = (int(v) for v in call.attrs.padding)
            padding = (top + extra[0], left + extra[1], bottom + extra[2], right + extra[3])
            attrs = call.attrs
            return relax.op.nn.conv2d(
                pad.args[0], call.args[1], strides=attrs.strides, padding=padding,
                dilation=attrs.dilation, groups=int(attrs.groups),
                data_layout=str(attrs.data_layout), kernel_layout=str(attrs.kernel_layout),
                out_layout=str(attrs.out_layout) or None, out_dtype=_dtype(attrs.out_dtype))

    return relax.transform.DeadCodeElimination()(mutate_relax_functions(mod, FoldPads(mod)))


def _dtype(value) -> str | None:
    text = str(value)
    return None if text in ("", "void", "None") else text


def _spatial_zero_pad(pad) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of a constant-zero ``pad`` of only the last two axes of a
    4-D tensor, else None."""
    if pad is None or getattr(getattr(pad, "op", None), "name", None) != "relax.nn.pad":
        return None
    attrs = pad.attrs
    if str(attrs.pad_mode) != "constant" or float(attrs.pad_value) != 0.0:
        return None
    width = [int(v) for v in attrs.pad_width]
    if len(width) != 8 or any(width[:4]) or min(width) < 0:
        return None
    return width[4], width[6], width[5], width[7]
