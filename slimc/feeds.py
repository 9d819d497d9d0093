"""What ``slimc.load(OUT)`` accepts as inputs, and how it checks them against the manifest.

Users call an artifact the way they call a Hugging Face model: ``model(**tokenizer(text))``
(numpy arrays, torch tensors, plain lists or a ``BatchEncoding``), ``model("text")`` or
``model(["a", "b"])`` through the tokenizer shipped in the artifact, or by input name. The rules:

* keys a tokenizer produces that the model does not take (``token_type_ids`` for a model
  without token types, ``special_tokens_mask``, ``offset_mapping``, ...) are dropped; any other
  unknown key is an error naming the model's inputs;
* a missing ``attention_mask`` is all ones, missing ``token_type_ids`` all zeros, missing
  ``position_ids`` ``0..n-1``; any other missing input is an error;
* integer inputs are cast to the compiled integer dtype (tokenizers give int64 or int32), a
  1-D array gets a batch axis when the model wants 2-D;
* every dim is checked against the manifest: a fixed dim must match, a dynamic dim must lie
  within its bounds, and dims sharing a name (the sequence length of ids and mask) must agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from slimc.errors import UsageError

#: Keys tokenizers return that a model may not take; dropped instead of rejected.
TOKENIZER_KEYS = frozenset({
    "input_ids", "attention_mask", "token_type_ids", "position_ids", "special_tokens_mask",
    "offset_mapping", "overflow_to_sample_mapping", "length", "num_truncated_tokens"})
#: Inputs slimc can fill in when the caller leaves them out: name -> how.
_FILLABLE = {"attention_mask": "ones", "token_type_ids": "zeros", "position_ids": "arange"}


def spec_dims(spec: Mapping[str, Any]) -> list[int | dict[str, Any]]:
    """A manifest input's dims: ints for fixed ones, ``{"name", "min", "max"}`` for dynamic."""
    return list(spec.get("dims") or spec["shape"])


def to_array(value: Any) -> np.ndarray:
    """numpy array of a numpy array, torch tensor, list or scalar."""
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def arrange(specs: Sequence[Mapping[str, Any]], args: Sequence[Any],
            kwargs: Mapping[str, Any]) -> list[np.ndarray]:
    """Inputs in the artifact's order, completed, cast and checked (see module docstring)."""
    names = [s["name"] for s in specs]
    if len(args) > len(names):
        raise UsageError(f"The model takes {len(names)} inputs ({', '.join(names)}), "
                         f"got {len(args)}.")
    values: dict[str, Any] = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key in names:
            values[key] = value
        elif key not in TOKENIZER_KEYS:
            raise UsageError(f"Unknown input {key!r}; the model's inputs are "
                             f"{', '.join(names)}.",
                             hint="Tokenizer outputs the model does not take are dropped; "
                             "other names must be the model's own.")
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec["name"] in values:
            arrays[spec["name"]] = _cast(spec, to_array(values[spec["name"]]))
    missing = [n for n in names if n not in arrays and n not in _FILLABLE]
    if missing:
        raise UsageError(f"Missing input(s) {', '.join(missing)}; the model's inputs are "
                         f"{', '.join(names)}.")
    reference = next(iter(arrays.values()), None)
    for spec in specs:
        if spec["name"] not in arrays:
            if reference is None or reference.ndim != len(spec["shape"]):
                raise UsageError(f"Missing input {spec['name']}.")
            arrays[spec["name"]] = _filled(spec, reference.shape)
    check(specs, arrays)
    return [np.require(arrays[n], requirements="C") for n in names]


def _cast(spec: Mapping[str, Any], array: np.ndarray) -> np.ndarray:
    want = np.dtype(spec["dtype"])
    if array.ndim == len(spec["shape"]) - 1 and array.ndim >= 1:
        array = array[None]  # one unbatched sequence (tokenizer output without tensors)
    if array.dtype != want and np.issubdtype(array.dtype, np.integer) \
            and np.issubdtype(want, np.integer):
        array = array.astype(want)
    elif array.dtype == np.bool_ and np.issubdtype(want, np.integer):
        array = array.astype(want)
    return array


def _filled(spec: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    how = _FILLABLE[spec["name"]]
    dtype = np.dtype(spec["dtype"])
    if how == "ones":
        return np.ones(shape, dtype)
    if how == "zeros":
        return np.zeros(shape, dtype)
    return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()


def check(specs: Sequence[Mapping[str, Any]], arrays: Mapping[str, np.ndarray]) -> None:
    """Raise a :class:`UsageError` unless every array fits its manifest entry."""
    seen: dict[str, tuple[int, str]] = {}
    for spec in specs:
        array = arrays[spec["name"]]
        dims = spec_dims(spec)
        if str(array.dtype) != spec["dtype"]:
            raise UsageError(f"Input {spec['name']} has dtype {array.dtype}; the artifact "
                             f"takes {spec['dtype']}.",
                             hint=f"Convert it, e.g. array.astype('{spec['dtype']}').")
        if not spec.get("dims") and list(array.shape) != list(spec["shape"]):
            raise UsageError(
                f"Input {spec['name']} has shape {list(array.shape)}; the artifact was "
                f"compiled for shape {spec['shape']} and dtype {spec['dtype']}.",
                hint=f"Recompile with --input {spec['name']}="
                f"{'x'.join(map(str, array.shape))}:{spec['dtype']} (LO..HI for a dynamic "
                "dim) or reshape the input.")
        if array.ndim != len(dims):
            raise UsageError(f"Input {spec['name']} has shape {list(array.shape)}; the "
                             f"artifact takes {describe(dims)}.")
        for axis, (size, dim) in enumerate(zip(array.shape, dims, strict=True)):
            if isinstance(dim, int):
                if size != dim:
                    raise UsageError(
                        f"Input {spec['name']} has shape {list(array.shape)}; the artifact was "
                        f"compiled for {describe(dims)} (dim {axis} fixed at {dim}).",
                        hint=f"Recompile with a dynamic dim, e.g. --input {spec['name']}="
                        f"{_dynamic_example(dims, axis, size)}:{spec['dtype']}, or reshape the "
                        "input.")
                continue
            low, high = dim.get("min") or 0, dim.get("max")
            if size < low or (high is not None and size > high):
                raise UsageError(
                    f"Input {spec['name']} has {dim['name']} = {size} (dim {axis}); the "
                    f"artifact takes {low}..{high if high is not None else ''} "
                    f"({describe(dims)}).",
                    hint="Truncate the input (tokenizer(..., truncation=True, max_length="
                    f"{high})) or recompile with larger bounds.")
            if dim["name"] in seen and seen[dim["name"]][0] != size:
                other_size, other = seen[dim["name"]]
                raise UsageError(
                    f"Inputs {other} and {spec['name']} must agree on {dim['name']}, but have "
                    f"{other_size} and {size}.",
                    hint="Give them from one tokenizer call (same padding).")
            seen.setdefault(dim["name"], (size, spec["name"]))


def describe(dims: Sequence[int | dict[str, Any]]) -> str:
    """``[1, seq 1..512]``: a manifest's dims as a reader would write them."""
    parts = [str(d) if isinstance(d, int) else
             f"{d['name']} {d.get('min', 0)}..{d.get('max') if d.get('max') is not None else ''}"
             for d in dims]
    return f"[{', '.join(parts)}]"


def _dynamic_example(dims: Sequence[int | dict[str, Any]], axis: int, size: int) -> str:
    return "x".join(f"1..{max(size, d)}" if i == axis and isinstance(d, int) else
                    (str(d) if isinstance(d, int) else f"{d['min']}..{d['max']}")
                    for i, d in enumerate(dims))


def sequence_bounds(spec: Mapping[str, Any]) -> tuple[int | None, int | None, bool]:
    """(batch, sequence length limit, whether the sequence is dynamic) of a token-id input;
    batch is None when dynamic."""
    dims = spec_dims(spec)
    batch = dims[0] if isinstance(dims[0], int) else None
    if len(dims) < 2:
        return batch, None, False
    seq = dims[1]
    if isinstance(seq, int):
        return batch, seq, False
    return batch, seq.get("max"), True
