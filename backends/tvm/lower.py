"""IR -> TVM Relax ``IRModule`` via ``from_exported_program``.

The IR is legalized first (see ``legalize.py``) so that architectures torch.export captures
also import and build; any op TVM still lacks is reported by name with the way to add it.
"""

from __future__ import annotations

import re
from typing import Any

from slimc.backends.tvm.bool_order import order_bools_as_ints
from slimc.backends.tvm.bounds import clamp_gathers
from slimc.backends.tvm.legalize import legalize
from slimc.backends.tvm.script_frames import memoised_frame_modules
from slimc.backends.tvm.weights import align_weights
from slimc.backends.tvm.zero_divisor import rewrite_zero_divisors

from slimc.errors import LoweringError, UsageError
from slimc.ir import IR


class UnsupportedOpError(UsageError, LoweringError):
    """An op in the model has no TVM converter (exit code 2: the user can add one)."""


@memoised_frame_modules()
def lower_to_relax(ir: IR, converters: dict[str, Any] | None = None, target=None):
    """Legalize ``ir`` in place and import it into a Relax ``IRModule`` with weights bound.

    Inference batch norms are folded into the convolution before them first (in place, as
    ``quantize`` does): TVM would otherwise decompose each into a subtract, divide, multiply and
    add in the conv's epilogue -- four more operations per output element, a divide among them
    -- and store its four vectors in the artifact.

    ``target`` (a ``tvm.target.Target``) is entered while importing, so converters that emit
    target-specific kernels (int8 dot products) read it from ``Target.current()``.
    """
    import contextlib

    from slimc.passes.quantize.batchnorm import fold_batchnorm
    from tvm.relax.frontend.torch import from_exported_program

    fold_batchnorm(ir)
    legalize(ir)
    align_weights(ir)  # TVM then shares the weights' memory instead of copying every one
    program, decomposed = ir.program, set()
    try:
        while True:
            try:
                with target if target is not None else contextlib.nullcontext():
                    mod = from_exported_program(
                        program, keep_params_as_input=False,
                        custom_convert_map=dict(converters) if converters else None)
                break
            except AssertionError as exc:
                program = _decompose_missing(program, _missing_ops(exc), decomposed)
                if program is None:
                    raise
        mod = rewrite_zero_divisors(mod)  # x / 0.0 has a value; TVM's folder stops on it
        mod = order_bools_as_ints(mod)  # TVM has no bool sort/max kernels
        return clamp_gathers(mod)  # no out-of-bounds reads, whoever calls the library
    except AssertionError as exc:
        ops = _missing_ops(exc)
        if ops:
            raise UnsupportedOpError(
                f"TVM {_tvm_version()} cannot lower op(s) {', '.join(ops)} used by "
                f"{ir.name!r}.",
                hint="Add a converter through a slimc plugin (hook slimc_register_converters, "
                "keyed by the op name shown), or replace the op in the model.",
            ) from None
        raise LoweringError(f"TVM failed to import {ir.name!r}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - TVM import bugs surface as many types
        mixed = _MIXED_FLOATS.search(str(exc))
        if mixed:
            raise UsageError(
                f"{ir.name!r} computes in {mixed['dtype']} inside forward() (a cast such as "
                f".half() or .double() on an activation): TVM {_tvm_version()} imports "
                "matrix products and convolutions with a float32 result, which then meets "
                f"the {mixed['dtype']} operand ({_first_line(exc)[:200]}).",
                hint="Keep forward() in float32 (remove the cast); slimc itself converts "
                "float16/bfloat16/float64 weights and inputs to float32.") from None
        op = _failing_op(exc)
        if op is not None:
            raise UnsupportedOpError(
                f"TVM {_tvm_version()} cannot import op {op} as {ir.name!r} uses it: its "
                f"converter failed ({type(exc).__name__}: {_first_line(exc)[:300]}).",
                hint="Add a converter through a slimc plugin (hook slimc_register_converters, "
                f"keyed {op!r}), or write the op another way in the model.") from None
        raise LoweringError(
            f"TVM failed to import {ir.name!r}: {type(exc).__name__}: {_first_line(exc)}",
            hint="Please report it with the model; `slimc compile --save-ir` writes the IR.",
        ) from exc


def _failing_op(exc: BaseException) -> str | None:
    """The ATen op (``index_put.default``) whose TVM converter raised ``exc``, or None.

    TVM's importer converts node by node; a converter that rejects its arguments (a shape or
    dtype combination it does not handle) raises a ValueError or TypeError that names no op.
    That is a limitation of the op's lowering the user can work around, not a slimc bug, so
    the innermost frame holding the FX ``node`` being converted names it.
    """
    from torch import fx

    name, tb = None, exc.__traceback__
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node")
        if isinstance(node, fx.Node) and node.op == "call_function":
            target = node.target
            name = getattr(target, "__name__", None) or str(target)
        tb = tb.tb_next
    return name


def _missing_ops(exc: AssertionError) -> list[str]:
    """The op names (``var_mean.correction``) in TVM's "Unsupported function types" message."""
    match = re.search(r"Unsupported function types \[(.*)\]", str(exc))
    return [op.strip(" '\"") for op in match.group(1).split(",") if op.strip()] if match else []


def _decompose_missing(program, names: list[str], done: set[str]):
    """``program`` with the ATen ops TVM has no converter for decomposed by torch's own
    decomposition table, or None when none of ``names`` has a (new) decomposition.

    TVM's importer decomposes to *core* ATen only, so ops that torch keeps in the core set
    (``prod.dim_int``, ``var_mean.correction``, ``cumprod``, ``unfold``) or that a converter
    lacks were refused although torch knows how to write them in ops TVM imports. Only a model
    that would otherwise be refused is decomposed (its other ops, and every other model, import
    as before); what the decomposition yields is checked by the same import, so an op that
    decomposes into unsupported ops is still refused by name. Several rounds cover a
    decomposition that yields another decomposable op.
    """
    import contextlib
    import io

    import torch
    from torch._decomp import core_aten_decompositions, decomposition_table

    table = {}
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(torch.ops.aten, packet, None), overload or "default", None)
        if op is not None and op in decomposition_table and name not in done:
            table[op] = decomposition_table[op]
            done.add(name)
    if not table:
        return None
    decompositions = core_aten_decompositions()
    decompositions.update(table)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return program.run_decompositions(decompositions)
    except Exception:  # noqa: BLE001 - the op stays unsupported and is reported by name
        return None


#: TVM's message when a float32 product meets an operand of another float dtype.
_MIXED_FLOATS = re.compile(r"must have the same datatype.*?(?P<dtype>b?float(?:16|64))", re.S)


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""
