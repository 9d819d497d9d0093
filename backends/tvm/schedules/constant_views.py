"""Evaluate layout and dtype ops on constants (weights) with numpy, before legalization.

The lowered model applies layout and dtype ops to its bound weights (``permute_dims``,
``reshape``, ``astype``, ``expand_dims``, ``squeeze``, ``strided_slice``, constant ``nn.pad``,
integer ``sum``, elementwise ``multiply``/``add``/``subtract``/``sqrt`` of constants;
``full``/``zeros``/``ones``/``arange`` make constants): every ``nn.Linear`` transposes its
weight, a W8A8 linear casts and reshapes its int8 codes and sums their rows (the zero-point
correction). TVM's ``FoldConstant`` after ``LegalizeOps`` does evaluate them, but by compiling
each distinct legalized kernel with LLVM and running it: on the real all-MiniLM-L6-v2 with W8A8
that was 9 kernels, 74 calls and ~7 s of CPU time, 90% of the whole ``relax.build``. The same
values from numpy cost milliseconds, so this pass computes them first and leaves
``FoldConstant`` nothing of this kind to build (it still folds whatever else is constant).
Values are bit for bit what the legalized kernels compute: pure data movement, single IEEE
operations (correctly rounded in both), and casts only between dtypes numpy represents exactly
the way TVM does (integer widening, float narrowing with round-to-nearest-even); anything else
is left to ``FoldConstant``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

from .common import mutate_relax_functions

#: dtypes whose numpy casts match TVM's (float -> int truncation is left to TVM: out-of-range
#: values are undefined in both, and nothing here needs it).
_NUMPY_DTYPES = {"float16", "float32", "float64", "int8", "int16", "int32", "int64",
                 "uint8", "uint16", "uint32", "uint64", "bool"}
_FLOAT = {"float16", "float32", "float64"}
_BINARY = {"relax.multiply": np.multiply, "relax.add": np.add, "relax.subtract": np.subtract}


def _static_type(expr) -> tuple[tuple[int, ...], str] | None:
    """``(shape, dtype)`` of a tensor-typed expression with a static shape, else None."""
    ty = getattr(expr, "ty", None)
    shape, dtype = getattr(ty, "shape", None), str(getattr(ty, "dtype", "") or "")
    if shape is None or dtype not in _NUMPY_DTYPES:
        return None
    try:
        return tuple(int(v) for v in shape), dtype
    except (TypeError, ValueError):  # symbolic sizes
        return None


def _constant_value(expr) -> np.ndarray | None:
    """A read-only numpy view of a constant's data (no copy: a weight can be 100+ MB)."""
    if isinstance(expr, tvm.ir.expr.Constant) and _static_type(expr) is not None:
        value = expr.value
        if value.device.dlpack_device_type() == 1:  # CPU memory: share it
            view = np.from_dlpack(value)
            view.flags.writeable = False
            return view
        return value.numpy()
    return None


#: TVM's kernels assume 64-byte aligned buffers (``kAllocAlignment``).
_ALIGNMENT = 64


def _constant(value: np.ndarray) -> relax.Constant:
    """A Relax constant holding ``value``, copied once into a 64-byte aligned buffer that the
    constant then shares (``relax.const`` would copy a contiguous result a second time)."""
    import tvm_ffi

    if value.size == 0:
        # ``torch.block_diag``'s 0-sized pieces: numpy gives an empty view a pointer and
        # strides of its own (not aligned, not compact), which TVM's kernels reject
        return relax.const(tvm.runtime.empty(value.shape, str(value.dtype)), str(value.dtype))
    raw = np.empty(value.nbytes + _ALIGNMENT, dtype=np.uint8)
    skip = -raw.ctypes.data % _ALIGNMENT
    out = raw[skip:skip + value.nbytes].view(value.dtype).reshape(value.shape)
    np.copyto(out, value)
    return relax.const(tvm_ffi.from_dlpack(out, require_alignment=_ALIGNMENT,
                                           require_contiguous=True), str(value.dtype))


def _cast(value: np.ndarray, dtype: str) -> np.ndarray | None:
    source = str(value.dtype)
    if source == dtype:
        return value
    if source in _FLOAT and dtype not in _FLOAT:
        return None  # float -> int/bool: leave it to TVM
    if dtype == "bool" or source == "bool":
        return None
    if source not in _FLOAT and dtype not in _FLOAT:
        if np.can_cast(value.dtype, dtype, casting="safe"):
            return value.astype(dtype)
        return None  # narrowing integer casts wrap: leave them to TVM
    return value.astype(dtype)  # int -> float, float -> float: round to nearest even


def fold_call(call: relax.Call) -> np.ndarray | None:
    """The value of ``call`` if it is a layout/dtype op on constants this pass evaluates."""
    name = getattr(call.op, "name", None)
    out = _static_type(call)
    if out is None:
        return None
    shape, dtype = out
    if name == "relax.full":
        fill = _constant_value(call.args[1]) if len(call.args) > 1 else None
        if fill is None or fill.size != 1:
            return None
        value = _cast(fill.reshape(()), dtype)
        return None if value is None else np.full(shape, value, dtype=dtype)
    if name in _BINARY:
        left, right = (_constant_value(a) for a in call.args[:2])
        if left is None or right is None or not str(left.dtype) == str(right.dtype) == dtype:
            return None
        # One IEEE operation per element (floats) or wrapping integer arithmetic: the values
        # TVM's kernel computes.
        return _BINARY[name](left, right).astype(dtype, copy=False)
    if name == "relax.sqrt":
        # IEEE square root, correctly rounded, as the ``llvm.sqrt`` of TVM's kernel: the batch
        # norms a conv cannot absorb (DenseNet's pre-activation ones) take sqrt(var + eps) of
        # every channel count, ~60 kernels FoldConstant compiled with LLVM (~12 s)
        data = _constant_value(call.args[0])
        if data is None or not str(data.dtype) == dtype in ("float32", "float64"):
            return None
        return np.sqrt(data).reshape(shape)
    if name == "relax.arange":
        try:
            start, stop, step = (int(a) for a in call.args[:3])
        except (TypeError, ValueError):
            return None
        value = np.arange(start, stop, step, dtype=dtype)
        return value if value.shape == shape else None
    if name in ("relax.zeros", "relax.ones"):
        return (np.zeros if name == "relax.zeros" else np.ones)(shape, dtype=dtype)
    if name not in ("relax.permute_dims", "relax.reshape", "relax.astype", "relax.expand_dims",
                    "relax.squeeze", "relax.sum", "relax.strided_slice", "relax.nn.pad"):
        return None
    data = _constant_value(call.args[0])
    if data is None:
        return None
    if name == "relax.sum":
        # Integer sums only (W8A8 weight row sums): exact in any order, as TVM's are.
        if str(data.dtype) != dtype or dtype in _FLOAT or dtype == "bool":
            return None
        axes = call.attrs.axis
        axes = tuple(range(data.ndim)) if axes is None else tuple(int(a) for a in axes)
        data = np.sum(data, axis=axes, keepdims=bool(call.attrs.keepdims), dtype=data.dtype)
    elif name == "relax.strided_slice":
        data = _slice(data, call.args[1:])
        if data is None:
            return None
    elif name == "relax.nn.pad":
        data = _pad(data, call.attrs)
        if data is None:
            return None
    elif name == "relax.permute_dims":
        axes = call.attrs.axes
        data = np.transpose(data, None if axes is None else [int(a) for a in axes])
    elif name == "relax.astype":
        data = _cast(data, dtype)
        if data is None:
            return None
    else:  # reshape, expand_dims, squeeze: the output type says the shape
        data = data.reshape(shape)
    if tuple(data.shape) != shape or str(data.dtype) != dtype:
        return None
    return data  # may be a view of the input constant: _constant copies it once


def _ints(expr) -> list[int] | None:
    """The integers of a Relax tuple of ``PrimValue`` s, else None."""
    try:
        return [int(getattr(f, "value", f)) for f in expr.fields]
    except (AttributeError, TypeError, ValueError):
        return None


def _slice(data: np.ndarray, args) -> np.ndarray | None:
    """``strided_slice(data, axes, begin, end[, strides])`` for in-bounds, positive-stride
    slices (anything else is left to TVM)."""
    parts = [_ints(a) for a in args]
    if len(parts) not in (3, 4) or any(p is None for p in parts):
        return None
    axes, begin, end = parts[:3]
    strides = parts[3] if len(parts) == 4 else [1] * len(axes)
    if not len(axes) == len(begin) == len(end) == len(strides):
        return None
    index = [slice(None)] * data.ndim
    for axis, b, e, step in zip(axes, begin, end, strides, strict=True):
        if not (0 <= axis < data.ndim and step > 0 and 0 <= b <= e <= data.shape[axis]):
            return None
        index[axis] = slice(b, e, step)
    return data[tuple(index)]


def _pad(data: np.ndarray, attrs) -> np.ndarray | None:
    """Constant-mode ``nn.pad`` with non-negative widths and a value the dtype holds exactly
    (int4 codes padded to whole groups); anything else is left to TVM."""
    if str(attrs.pad_mode) != "constant":
        return None
    widths = [int(w) for w in attrs.pad_width]
    value = float(attrs.pad_value)
    if len(widths) != 2 * data.ndim or min(widths) < 0:
        return None
    if str(data.dtype) not in _FLOAT:
        info = np.iinfo(data.dtype) if data.dtype != np.bool_ else None
        if info is None or value != int(value) or not info.min <= value <= info.max:
            return None
    return np.pad(data, list(zip(widths[::2], widths[1::2], strict=True)),
                  constant_values=np.asarray(value).astype(data.dtype))


@expr_functor.mutator
class _FoldConstantViews(PyExprMutator):
    def _inline(self, var):
        bound = self.lookup_binding(var)
        return bound if isinstance(bound, tvm.ir.expr.Constant) else var

    def visit_var_(self, var):
        return self._inline(var)

    def visit_dataflow_var_(self, var):
        return self._inline(var)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        value = fold_call(call) if isinstance(call.op, tvm.ir.Op) else None
        return call if value is None else _constant(value)


def fold_constant_views() -> tvm.transform.Pass:
    """The module pass: see the module docstring."""
    def run(mod, _ctx):
        return mutate_relax_functions(mod, _FoldConstantViews(mod))

    return tvm.transform.module_pass(run, opt_level=0, name="SlimcFoldConstantViews")
