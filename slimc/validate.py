"""Checks on the captured model and its data, run before compression and lowering.

Each one turns a problem that would otherwise surface much later (as an artifact that
"disagrees with the IR", or as memory read past a table) into one paragraph naming the tensor
or input at fault:

* :func:`check_finite_weights`: NaN/Inf weights, named by their state-dict key;
* :func:`integer_input_ranges`: the valid values of each integer input, from the tables it
  indexes (token ids: ``0 .. vocab_size - 1``), recorded in the manifest and checked by
  ``slimc.load``/``slimc run``;
* :func:`check_batches`: calibration/example batches with NaN/Inf or out-of-range ids.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.export.graph_signature import InputKind

from slimc.errors import UsageError
from slimc.ir import IR

aten = torch.ops.aten

#: Ops that pass integer values through unchanged (only the shape or dtype changes).
_TRANSPARENT = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints,
    aten.clone.default, aten.contiguous.default, aten.expand.default, aten._to_copy.default,
    aten.to.dtype, aten.slice.Tensor, aten.select.int, aten.alias.default,
    aten.permute.default, aten.t.default, aten.transpose.int, aten.lift_fresh_copy.default,
}


def _rows(node: torch.fx.Node, dim: int = 0) -> int | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    shape = getattr(val, "shape", None)
    if shape is None or len(shape) <= dim:
        return None
    if isinstance(shape[dim], torch.SymInt):
        return None  # a dynamic dim: int() would specialise it to its example size
    try:
        return int(shape[dim])
    except TypeError:  # symbolic
        return None


def _table_bounds(user: torch.fx.Node, source: torch.fx.Node) -> tuple[int, int] | None:
    """(lo, hi) of valid index values when ``user`` indexes a table with ``source``."""
    target, args = user.target, user.args
    if target == aten.embedding.default and len(args) > 1 and args[1] is source:
        rows = _rows(args[0])
        return (0, rows - 1) if rows else None
    if target == aten.index_select.default and len(args) > 2 and args[2] is source:
        rows = _rows(args[0], int(args[1]))
        return (0, rows - 1) if rows else None
    if target == aten.index.Tensor and len(args) > 1:
        for dim, index in enumerate(args[1]):
            if index is source:
                rows = _rows(args[0], dim)
                return (-rows, rows - 1) if rows else None
    name = str(target)
    ids_position = {"embedding_int8": 2, "embedding_int4": 3, "embedding_lowbit": 3}
    for op, position in ids_position.items():
        if f"slimc.{op}" in name and len(args) > position and args[position] is source:
            rows = _rows(args[0])
            return (0, rows - 1) if rows else None
    return None


def integer_input_ranges(ir: IR) -> dict[str, tuple[int, int]]:
    """``{input name: (min, max)}`` for integer inputs that index a table directly (through
    reshapes and casts only); inputs used any other way (masks, arithmetic) get no range."""
    ranges: dict[str, tuple[int, int]] = {}
    for name, node in zip(ir.input_names, ir._user_placeholders(), strict=False):
        val = node.meta.get("val")
        if val is None or val.dtype.is_floating_point or val.dtype == torch.bool:
            continue
        bounds: list[tuple[int, int]] = []
        frontier, seen = [node], set()
        while frontier:
            current = frontier.pop()
            if current in seen:
                continue
            seen.add(current)
            for user in current.users:
                if user.op != "call_function":
                    continue
                found = _table_bounds(user, current)
                if found:
                    bounds.append(found)
                elif user.target in _TRANSPARENT and user.args and user.args[0] is current:
                    frontier.append(user)
        if bounds:
            ranges[name] = (max(b[0] for b in bounds), min(b[1] for b in bounds))
    return ranges


def check_finite_weights(ir: IR) -> None:
    """Raise a UsageError naming the first weight that holds NaN or Inf.

    A buffer or constant may hold -inf: that is how an additive attention mask (a causal
    ``triu`` of -inf registered as a buffer) says "never attend here", and the model is healthy.
    NaN anywhere, +inf anywhere and -inf in a trained parameter are a broken checkpoint.
    """
    signature = ir.program.graph_signature
    for spec in signature.input_specs:
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            continue
        value = ir._state_value(spec)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        if _all_finite(value, allow_neg_inf=spec.kind is not InputKind.PARAMETER):
            continue
        finite = torch.isfinite(value)
        if spec.kind is not InputKind.PARAMETER:
            finite |= torch.isneginf(value)  # a mask's "never attend"
        if not bool(finite.all()):
            bad = int((~finite).sum())
            kinds = [k for k, f in (("NaN", torch.isnan), ("Inf", torch.isinf))
                     if bool(f(value).any())]
            raise UsageError(
                f"Weight {spec.target!r} of {ir.name!r} holds {bad} {'/'.join(kinds)} "
                f"value(s) out of {value.numel()}; compression and the compiled library "
                "would only spread them.", hint="Fix the checkpoint (re-export it from a "
                "healthy training run) before compiling it.")


def _all_finite(value: torch.Tensor, allow_neg_inf: bool) -> bool:
    """Whether ``value`` holds no NaN and no +inf (nor -inf unless ``allow_neg_inf``).

    Why not ``torch.isfinite(value).all()``: that writes a boolean tensor the size of the
    weight and reads it again, ~5 CPU-seconds over a 320M-parameter decoder (issue 18), and
    every compile pays it. One min/max reduction reads each weight once and allocates nothing
    (~20x less): NaN propagates into both results, an infinity shows in one of them. The
    caller counts and names the bad values when this says there are some."""
    if value.numel() == 0:
        return True
    try:
        low, high = (float(v) for v in torch.aminmax(value.detach()))
    except RuntimeError:  # a dtype without a min/max kernel (float8): the full check decides
        return False
    if math.isnan(low) or math.isnan(high) or high == math.inf:
        return False
    return allow_neg_inf or low != -math.inf


def check_batches(batches: Iterable[dict[str, torch.Tensor]],
                  ranges: dict[str, tuple[int, int]], origin: str) -> None:
    """Reject batches with NaN/Inf floats or integer inputs outside their valid range."""
    for i, batch in enumerate(batches):
        for name, value in batch.items():
            if not isinstance(value, torch.Tensor) or value.numel() == 0:
                continue
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise UsageError(f"{origin}: batch {i}, input {name!r} holds NaN or Inf.",
                                 hint="Clean the data (every value must be a finite number).")
            if name in ranges and not value.is_floating_point():
                lo, hi = ranges[name]
                if int(value.min()) < lo or int(value.max()) > hi:
                    raise UsageError(
                        f"{origin}: batch {i}, input {name!r} holds ids from {int(value.min())} "
                        f"to {int(value.max())}, outside the model's valid range {lo} .. {hi}.",
                        hint="Tokenize the data with this model's own tokenizer.")
