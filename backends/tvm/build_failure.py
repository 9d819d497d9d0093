"""Which op a failed TVM build failed on, so a limitation of TVM is reported as one.

A model that imports can still fail to *build*: TVM's lowering of one op (its legalization,
TIR simplification or LLVM code generation) rejects a dtype or shape combination -- an LLVM
``fcmp`` on booleans for ``count_nonzero``, a constant division by zero simplified at build
time. The build error names no op, so before this every such model ended in "TVM could not
build the model ... please report it" (exit 1), although the user can avoid the op.

Before the build, :func:`op_signatures` records every distinct Relax op call of the module as
its op, attributes and argument *types* (no weights). When the build fails,
:func:`failing_op` builds each signature alone with TVM's default pipeline: an op that fails
alone is TVM's limitation with that op on those types (exit 2, naming it); when every op
builds alone the failure is in slimc's schedules or the fusion of several ops, a slimc bug
(exit 1, as before).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

#: The most signatures / seconds spent looking for the failing op after a failed build.
MAX_SIGNATURES = 400
MAX_SECONDS = 240.0


@dataclass(frozen=True)
class OpSignature:
    """One Relax op call as types: ``args`` holds the type of each tensor (or tuple of
    tensors) argument and the argument itself otherwise (shapes, prim values, dtypes)."""

    op: Any
    args: tuple
    attrs: Any
    ty_args: tuple

    def describe(self) -> str:
        types = [_describe(a) for a in self.args if _is_tensor_info(a)]
        return f"{self.op.name}({', '.join(types)})"


def _is_tensor_info(value) -> bool:
    from tvm import relax

    if isinstance(value, relax.TupleType):  # tuples of tensors only, not of shapes/values
        return bool(value.fields) and all(_is_tensor_info(f) for f in value.fields)
    return isinstance(value, relax.TensorType)


def _describe(info) -> str:
    from tvm import relax

    if isinstance(info, relax.TupleType):
        return "(" + ", ".join(_describe(f) for f in info.fields) + ")"
    shape = getattr(info, "shape", None)
    try:
        dims = "x".join(str(getattr(d, "value", d)) for d in shape)
    except TypeError:
        dims = "?"
    return f"{info.dtype}[{dims}]"


def op_signatures(mod) -> list[OpSignature]:
    """The distinct calls of ops that TVM legalizes, in the order they first appear."""
    import tvm
    from tvm import relax

    seen: dict[str, OpSignature] = {}

    def visit(expr) -> None:
        if not isinstance(expr, relax.Call) or not isinstance(expr.op, tvm.ir.Op):
            return
        if expr.op.get_attr("FLegalize") is None:
            return  # call_tir and other calls of built kernels: slimc's own
        args = []
        for arg in expr.args:
            info = getattr(arg, "ty", None)
            if isinstance(arg, (relax.Var, tvm.ir.Constant, relax.Tuple)) and \
                    _is_tensor_info(info):
                args.append(info)
            else:
                args.append(arg)
        sig = OpSignature(expr.op, tuple(args), expr.attrs, tuple(expr.ty_args))
        key = f"{expr.op.name}|{[str(a) for a in args]}|{expr.attrs}|{sig.ty_args}"
        seen.setdefault(key, sig)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return list(seen.values())


def failing_op(signatures: list[OpSignature], target) -> tuple[OpSignature, str] | None:
    """The first signature that fails to build alone (TVM's default pipeline for ``target``)
    and its error's last line, or None."""
    start = time.monotonic()
    for sig in signatures[:MAX_SIGNATURES]:
        if time.monotonic() - start > MAX_SECONDS:
            return None
        try:
            _build_alone(sig, target)
        except Exception as exc:  # noqa: BLE001 - any failure of the op alone is the answer
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            return sig, f"{type(exc).__name__}: {lines[-1] if lines else ''}"
    return None


def _build_alone(sig: OpSignature, target) -> None:
    import tvm
    from tvm import relax

    params, args = [], []
    for i, arg in enumerate(sig.args):
        if _is_tensor_info(arg):
            var = relax.Var(f"a{i}", arg)
            params.append(var)
            args.append(var)
        else:
            args.append(arg)
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        out = bb.emit(relax.Call(sig.op, args, sig.attrs, list(sig.ty_args)))
        bb.emit_func_output(out)
    with tvm.transform.PassContext(opt_level=3):
        relax.build(bb.get(), target=target)
