"""Arithmetic precision of a target: ``fp32``, or ``fp16`` / ``bf16`` with fp32 accumulation.

Precision is a *target option* (``--target cuda:precision=bf16``), not a pass, because it is a
lowering decision: the IR stays fp32 and target-independent (``quantize{weights=fp16}`` is the
pass that changes what is *stored*), while the backend decides how the arithmetic of each
kernel runs on the device, the way ``-mattr`` or ``-ffast-math`` belong to a target. GPU
backends convert the lowered module with TVM's ``ToMixedPrecision``: matmuls take fp16/bf16
operands and accumulate in fp32 (tensor cores on sm_70+ through dlight's Matmul rule),
element-wise ops run in fp16/bf16, softmax stays fp32 and norms reduce in fp32.

Half-precision results differ from the fp32 IR by rounding, so verification compares them
with :data:`TOLERANCE` (raised by ``--verify-tol`` if larger).
"""

from __future__ import annotations

from typing import Any

from slimc.errors import UsageError

#: slimc precision name -> TVM dtype of activations and arithmetic.
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

#: Relative L2 error allowed between a half-precision artifact and the fp32 IR on the example
#: input. fp16 keeps 11 significant bits (unit roundoff 4.9e-4) and bf16 8 (3.9e-3); errors of
#: a few dozen roundings accumulate through a deep network's residual stream, hence ~20x the
#: unit roundoff (measured: tests/test_gpu_precision.py, docs/benchmarks.md).
TOLERANCE = {"fp32": 0.0, "fp16": 1e-2, "bf16": 8e-2}

#: Keys of ``--target NAME:KEY=VALUE`` that are slimc's, not TVM target attributes.
TARGET_OPTIONS = ("precision",)


def check_precision(value: Any, target: str) -> str:
    """``value`` as a precision name, or a usage error naming the choices."""
    name = str(value).strip().lower()
    if name not in DTYPES:
        raise UsageError(f"Unknown precision {value!r} for target {target!r}.",
                         hint="Use precision=fp16 (default on CUDA), bf16 or fp32, e.g. "
                         "--target cuda:precision=bf16.")
    return name


def tolerance(precision: str) -> float:
    """Smallest verification tolerance for artifacts computing in ``precision``."""
    return TOLERANCE.get(precision, 0.0)
