"""slimc's quantized-op dialect: the ``slimc::*`` ops, their reference maths, and the table
of per-target lowerings.

Why custom ops: after ``quantize`` the IR must stay executable (every transform is verified by
running it) *and* must carry the packed weights as they will be stored in the artifact. An
``aten`` dequantize followed by ``aten.linear`` would do the first, but TVM's ``FoldConstant``
folds ``dequantize(constant)`` back into an fp32 constant and the artifact would silently be
fp32 again. So the IR uses opaque ops (``slimc::linear_int8`` ...) whose operands are the
packed tensors, and each backend lowers one of them to an ``R.call_tir`` of a kernel that
unpacks and dequantizes *inside* the matmul (or gather) loop nest. The only constant folding
that can happen is the layout change of the packed weight (int8 stays int8).

Ops (``x``: ``[..., K]`` float32; ``act_scale``: optional ``[K]`` per-input-channel multiplier
that AWQ uses, applied to ``x`` before the matmul):

* ``linear_int8(x, qweight int8[N,K], scale f32[N], bias?, act_scale?)``
* ``linear_int4(x, packed uint8[N,K/2], scale f32[N,G], zero uint8[N,G], bias?, act_scale?,
  group_size)``; code ``k`` of row ``n`` is nibble ``k % 2`` (low first) of ``packed[n, k//2]``
  and dequantizes to ``(code - zero[n, k//g]) * scale[n, k//g]``.
* ``linear_w8a8(x, qweight int8[N,K], in_mult f32[K], out_scale f32[N], bias?,
  zero_point)``: int8 weights *and* activations. ``x`` is quantized statically, ``a =
  clamp(round(x * in_mult) + zero_point, -128, 127)`` (``in_mult`` folds the calibrated input
  scale and any SmoothQuant per-channel factor; ``zero_point`` is 0 for a symmetric range), the
  matmul runs in integers and ``y = ((a - zero_point) @ qweight.T) * out_scale + bias``.
  Lowered to the dot-product kernels of ``int8_kernels`` (VNNI, sdot, or a generic int8
  kernel), which take ``zero_point * sum_k qweight[n, k]`` back out in integers. With
  ``per_row`` (dynamic, per-token scales: ``zero_point`` 0) each row's scale is its own
  ``max |x * in_mult| / 127``, found at run time (``quantize_rows``; ``in_mult`` is then only
  the SmoothQuant factor), and ``y = (a @ qweight.T) * out_scale * row_scale + bias``
  (``out_scale``: the weight's per-row scales).
* ``linear_fp16(x, weight f16[N,K], bias?)`` / ``linear_bf16(x, weight bf16[N,K], bias?)``
* ``embedding_int8(qweight, scale, ids)`` / ``embedding_int4(packed, scale, zero, ids,
  group_size)``: gather rows, then dequantize (row = vocabulary entry, so a tied output head
  shares the same packed table).

Lowerings are registered per (op, TVM target kind) with :func:`register_lowering` by the
backends that implement them (``backends/tvm/quantized_ops.py`` for ``llvm``,
``backends/tvm/gpu_quantized.py`` for every GPU kind); :func:`converters` gives TVM one
converter per op that picks the lowering for the target being built
(``Target.current()``). This module imports no backend, so passes can use the ops and the
reference maths without loading TVM.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Reference (PyTorch) semantics, shared by the ops and by the quantization code
# ---------------------------------------------------------------------------------------------


def unpack_int4(packed: Tensor, k: int) -> Tensor:
    """``uint8[N, ceil(K/2)]`` -> codes ``uint8[N, K]`` (low nibble holds the even column)."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)[:, :k]


def int4_grid_values(codes: Tensor, scale: Tensor, zero: Tensor, index: Tensor) -> Tensor:
    """Float values of int4 ``codes`` (float32, groups ``index`` along the last axis): an
    integer zero point gives ``(code - zero) * scale``; a floating ``zero`` is the group's
    minimum (GGUF Q4_1's layout, fp16 scale and minimum) and gives ``code * scale + zero``."""
    step = scale.float()[..., index]
    if zero.is_floating_point():
        return codes * step + zero.float()[..., index]
    return (codes - zero.float()[..., index]) * step


#: Elements of a weight dequantized at once by :func:`dequantize_int4` (4M floats: 16 MB).
DEQUANTIZE_CHUNK = 1 << 22


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int,
                    k: int) -> Tensor:
    """Float weight ``[N, K]`` from packed int4 codes and per-group scale / zero point.

    A large weight is dequantized a block of rows at a time into its output: the same values
    (every grid is per row), one weight-sized tensor instead of five (codes, gathered scales
    and minimums, their product and sum). Why: every eager forward of an int4 model
    dequantizes each weight, and SmolLM2's tied 49152 x 576 table made a ~0.4 GB spike in the
    pass manager's check of ``quantize{weights=int4}`` (1 GB for the 320M decoder's; issue 18)."""
    index = torch.arange(k) // group_size
    n = packed.shape[0]
    rows = max(1, DEQUANTIZE_CHUNK // max(k, 1))
    grad = torch.is_grad_enabled() and (scale.requires_grad or zero.requires_grad)
    values = int4_grid_values
    if (not grad and packed.dim() == 2 and scale.dim() == 2 and zero.dim() == 2
            and k % group_size == 0 and scale.shape[1] * group_size == k
            and zero.shape[1] * group_size == k):
        values = _grouped_grid_values
    if (n <= rows or packed.dim() != 2 or scale.dim() < 1 or zero.dim() < 1
            or scale.shape[0] != n or zero.shape[0] != n or grad):
        return values(unpack_int4(packed, k).float(), scale, zero, index)
    out = torch.empty(n, k, dtype=torch.float32)
    for start in range(0, n, rows):
        end = start + rows
        out[start:end] = values(unpack_int4(packed[start:end], k).float(),
                                scale[start:end], zero[start:end], index)
    return out


def _grouped_grid_values(codes: Tensor, scale: Tensor, zero: Tensor, index: Tensor) -> Tensor:
    """:func:`int4_grid_values` for ``codes [N, K]`` in whole groups (``scale`` and ``zero``
    ``[N, K / group]``), bit for bit (the same operations on each element), in place on
    ``codes`` viewed as ``[N, groups, group]``: no per-element copies of the scales and
    zeros. Why: every eager forward of an int4 model dequantizes each weight, the budget
    search's candidates included (issue 18)."""
    n, k = codes.shape
    grouped = codes.reshape(n, scale.shape[1], k // scale.shape[1])
    step = scale.float()[..., None]
    if zero.is_floating_point():
        return grouped.mul_(step).add_(zero.float()[..., None]).reshape(n, k)
    return grouped.sub_(zero.float()[..., None]).mul_(step).reshape(n, k)


def dequantize_int8(qweight: Tensor, scale: Tensor) -> Tensor:
    if torch.is_grad_enabled() and scale.requires_grad:
        return qweight.float() * scale[:, None]
    # in place on a fresh copy: one weight-sized tensor, not two (the same values); copy=True
    # so a weight that is float already is never scaled where it is stored
    return qweight.to(torch.float32, copy=True).mul_(scale[:, None])


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, act_scale: Tensor | None) -> Tensor:
    if act_scale is not None:
        x = x * act_scale
    return F.linear(x, weight, bias)


# ---------------------------------------------------------------------------------------------
# torch.library custom ops (eager kernels + fake kernels for torch.export re-decomposition)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("slimc::linear_int8", mutates_args=())
def linear_int8(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None,
                act_scale: Tensor | None) -> Tensor:
    return _linear(x, dequantize_int8(qweight, scale), bias, act_scale)


@torch.library.custom_op("slimc::linear_int4", mutates_args=())
def linear_int4(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None,
                act_scale: Tensor | None, group_size: int) -> Tensor:
    weight = dequantize_int4(packed, scale, zero, group_size, x.shape[-1])
    return _linear(x, weight, bias, act_scale)


class _Jitter(threading.local):
    """Relative perturbation applied to W8A8 inputs before rounding (see
    ``rounding_noise_floor``), per thread: the floor's seeds run in parallel threads."""

    relative: float = 0.0
    generator: torch.Generator | None = None


_JITTER = _Jitter()


def _jittered(scaled: Tensor) -> Tensor:
    """``scaled`` with :data:`_JITTER`'s relative noise (only while
    :func:`rounding_noise_floor` measures), else itself."""
    if not _JITTER.relative:
        return scaled
    noise = torch.rand(scaled.shape, generator=_JITTER.generator) * 2.0 - 1.0
    return scaled * (1.0 + _JITTER.relative * noise)


def quantize_activation(x: Tensor, in_mult: Tensor, zero_point: int = 0) -> Tensor:
    """Static int8 activation codes (as float): ``clamp(round(x * in_mult) + zp, -128, 127)``."""
    scaled = x * in_mult
    scaled = _jittered(scaled)
    return torch.clamp(torch.round(scaled) + zero_point, -128.0, 127.0)


#: Smallest row maximum a per-row scale divides by (an all-zero row gets codes 0).
ROW_TINY = 1e-30


def quantize_rows(x: Tensor, in_mult: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row (per-token) int8 codes (as float) and their scales: ``s = x * in_mult``,
    ``codes = clamp(round(s * (127 / amax_row|s|)), -127, 127)``, ``scale = amax_row / 127``
    (``[..., 1]``). The row's range is found at run time, so nothing is clipped and no
    calibrated range can be wrong for an input; ``in_mult`` is only the SmoothQuant factor."""
    scaled = x * in_mult
    scaled = _jittered(scaled)
    amax = scaled.abs().amax(-1, keepdim=True).clamp_min(ROW_TINY)
    codes = torch.clamp(torch.round(scaled * (127.0 / amax)), -127.0, 127.0)
    return codes, amax / 127.0


#: Relative size of the float differences between PyTorch and a compiled kernel on the same
#: activation (a different summation order in a LayerNorm or matmul: up to ~16 ulps of fp32).
KERNEL_FLOAT_NOISE = 1e-6


def rounding_noise_floor(ir, inputs, reference=None, seeds: int = 2) -> float | None:
    """How far float noise alone moves the outputs of an IR with static int8 activations.

    Rounding to a fixed grid is discontinuous: a compiled artifact whose LayerNorm sums in a
    different order gets an activation a few ulps off, a few codes round the other way, and the
    change grows through the following layers (measured on all-MiniLM-L6-v2 with a correct
    artifact: relative L2 2e-7 after one W8A8 encoder layer, 3e-3 after two, 4e-2 after six).
    Comparing such an artifact with the IR at a fixed 1e-3 would reject correct builds, so the
    compiler compares it with this floor instead: the relative L2 between the IR's outputs and
    the IR's outputs with every W8A8 input perturbed by ``KERNEL_FLOAT_NOISE`` (relative,
    uniform), the largest over ``seeds`` perturbations. None (and nothing run) if the IR has
    no such op. ``reference``: the IR's unperturbed outputs (numpy), if the caller has them.
    """
    import numpy as np

    from slimc.jobs import map_single_threaded

    static = (OPS["linear_w8a8"], OPS.get("conv_w8a8"))
    if not any(node.target in static for node in ir.nodes("call_function")):
        return None
    if reference is None:
        reference = [t.detach().numpy() for t in ir.run(inputs)]
    # float64: outputs may be integer (int8 codes) or float16, whose squares overflow
    reference = [np.asarray(b, dtype=np.float64) for b in reference]
    den = sum(float(np.sum(b ** 2)) for b in reference) or 1.0

    def perturbed(seed: int) -> float:  # seeds run in parallel, each with its own jitter
        _JITTER.relative = KERNEL_FLOAT_NOISE
        _JITTER.generator = torch.Generator().manual_seed(seed)
        try:
            noisy = [t.detach().numpy() for t in ir.run(inputs)]
        finally:
            _JITTER.relative, _JITTER.generator = 0.0, None
        num = sum(float(np.sum((np.asarray(a, dtype=np.float64) - b) ** 2))
                  for a, b in zip(noisy, reference, strict=True))
        return (num / den) ** 0.5

    return max(map_single_threaded(perturbed, list(range(seeds))), default=0.0)


@torch.library.custom_op("slimc::linear_w8a8", mutates_args=())
def linear_w8a8(x: Tensor, qweight: Tensor, in_mult: Tensor, out_scale: Tensor,
                bias: Tensor | None, zero_point: int, per_row: bool = False) -> Tensor:
    # Integer-valued float32 matmul: exact while partial sums stay below 2**24, and within
    # float rounding of the artifact's int32 accumulation beyond that.
    if per_row:
        codes, row_scale = quantize_rows(x, in_mult)
        y = F.linear(codes, qweight.float()) * out_scale * row_scale
    else:
        codes = quantize_activation(x, in_mult, zero_point) - zero_point
        y = F.linear(codes, qweight.float()) * out_scale
    return y + bias if bias is not None else y


@torch.library.custom_op("slimc::linear_fp16", mutates_args=())
def linear_fp16(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight.float(), bias)


@torch.library.custom_op("slimc::linear_bf16", mutates_args=())
def linear_bf16(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight.float(), bias)


@torch.library.custom_op("slimc::embedding_int8", mutates_args=())
def embedding_int8(qweight: Tensor, scale: Tensor, ids: Tensor) -> Tensor:
    return qweight[ids].float() * scale[ids][..., None]


def embedding_int4_dim(packed_width: int, groups: int, group_size: int) -> int:
    """Row width of a packed int4 table: ``2 * packed_width`` unless the groups end earlier
    (the last group may be partial, e.g. 576 = 4.5 groups of 128; ``quantize_ir`` stores odd
    widths as int8, so the width is even)."""
    return min(2 * packed_width, groups * group_size)


@torch.library.custom_op("slimc::embedding_int4", mutates_args=())
def embedding_int4(packed: Tensor, scale: Tensor, zero: Tensor, ids: Tensor,
                   group_size: int) -> Tensor:
    dim = embedding_int4_dim(packed.shape[1], scale.shape[1], group_size)
    flat = ids.reshape(-1)
    rows = dequantize_int4(packed[flat], scale[flat], zero[flat], group_size, dim)
    return rows.reshape(*ids.shape, dim)


def _fake_linear(x: Tensor, weight_rows: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight_rows))


@linear_int8.register_fake
def _(x, qweight, scale, bias, act_scale):
    return _fake_linear(x, qweight.shape[0])


@linear_int4.register_fake
def _(x, packed, scale, zero, bias, act_scale, group_size):
    return _fake_linear(x, packed.shape[0])


@linear_w8a8.register_fake
def _(x, qweight, in_mult, out_scale, bias, zero_point, per_row=False):
    return _fake_linear(x, qweight.shape[0])


@linear_fp16.register_fake
def _(x, weight, bias):
    return _fake_linear(x, weight.shape[0])


@linear_bf16.register_fake
def _(x, weight, bias):
    return _fake_linear(x, weight.shape[0])


# The gathered rows are float32 whatever the scales are stored in (the eager kernels compute in
# float32, and so do the TVM kernels): a fake that followed ``scale``'s dtype said float16 for
# the fp16 scales of ``zero_point=float`` grids, and the graph's own dtype checks after the
# lookup (``_assert_tensor_metadata`` of an RMSNorm's ``.to(float32)``) then failed to import.
@embedding_int8.register_fake
def _(qweight, scale, ids):
    return scale.new_empty((*ids.shape, qweight.shape[1]), dtype=torch.float32)


@embedding_int4.register_fake
def _(packed, scale, zero, ids, group_size):
    dim = embedding_int4_dim(packed.shape[1], scale.shape[1], group_size)
    return scale.new_empty((*ids.shape, dim), dtype=torch.float32)


OPS = {
    "linear_int8": torch.ops.slimc.linear_int8.default,
    "linear_int4": torch.ops.slimc.linear_int4.default,
    "linear_w8a8": torch.ops.slimc.linear_w8a8.default,
    "linear_fp16": torch.ops.slimc.linear_fp16.default,
    "linear_bf16": torch.ops.slimc.linear_bf16.default,
    "embedding_int8": torch.ops.slimc.embedding_int8.default,
    "embedding_int4": torch.ops.slimc.embedding_int4.default,
}


# ---------------------------------------------------------------------------------------------
# Lowerings per (op, target kind)
# ---------------------------------------------------------------------------------------------

#: (op name in ``OPS``, TVM target kind or device key "cpu"/"gpu") -> ``fn(node, importer)``.
_LOWERINGS: dict[tuple[str, str], Callable[[Any, Any], Any]] = {}


def register_lowering(op: str, kind: str, fn: Callable[[Any, Any], Any]) -> None:
    """Make ``fn(node, importer) -> relax.Expr`` the lowering of ``op`` for targets of TVM kind
    ``kind`` (``llvm``, ``cuda``...) or device key ``cpu``/``gpu`` (any kind with that key)."""
    if op not in OPS:
        raise KeyError(f"unknown slimc op {op!r}")
    _LOWERINGS[(op, kind)] = fn


def lowering_for(op: str, target) -> Callable[[Any, Any], Any]:
    """The lowering of ``op`` for ``target`` (a ``tvm.target.Target``; None means llvm)."""
    kinds = ["llvm", "cpu"] if target is None else [target.kind.name, *map(str, target.keys)]
    for kind in kinds:
        if (op, kind) in _LOWERINGS:
            return _LOWERINGS[(op, kind)]
    from slimc.errors import LoweringError

    raise LoweringError(f"slimc::{op} has no lowering for {kinds[0]} targets.",
                        hint="Pick another weight format for this target (see `slimc "
                        "targets`), or register one with slimc.dialect.register_lowering.")


def converters() -> dict[str, Any]:
    """TVM converters (``custom_convert_map`` keys) that dispatch each op by target."""

    def dispatch(op: str):
        def convert(node, importer):
            from tvm.target import Target

            return lowering_for(op, Target.current(allow_none=True))(node, importer)

        return convert

    return {OPS[name].__name__: dispatch(name) for name in OPS}


# Convolutions and expert gathers, and the int3/int2 ops, live in their own modules; importing
# them adds them to ``OPS`` (they import this module, which is complete by now).
from slimc import coded_scales, dialect_conv, dialect_lowbit  # noqa: E402,F401,I001

#: ``-qs`` grids: ``coded_scale(code, unit, like)`` rebuilds a group's fp16 step or minimum
#: (:mod:`slimc.coded_scales`).
OPS["coded_scale"] = torch.ops.slimc.coded_scale.default
