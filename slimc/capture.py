"""Capture: MODEL string -> loader -> ``torch.export`` -> :class:`~slimc.ir.IR`.

Export failures are translated into one paragraph that names the failing op or source line and
what to try, instead of torch's multi-page traceback.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from slimc.errors import CaptureError, UsageError
from slimc.ir import IR, _output_names
from slimc.layers import linearize_weight_matmuls
from slimc.loaders.base import (
    DEFAULT_SEQUENCE,
    TRUST_REMOTE_CODE,
    InputOverride,
    LoadedModel,
    random_tensor,
)
from slimc.plugins import Registry, get_registry

_USER_FRAME = re.compile(
    r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)\n\s+(?P<code>.+)')
_TORCH_INTERNAL = ("/torch/", "/slimc/", "/_pytest/", "<frozen", "/contextlib.py", "/pluggy/")


def find_loader(model: str, registry: Registry | None = None):
    registry = registry or get_registry()
    for loader in registry.loaders:
        if loader.accepts(model):
            return loader
    forms = "; ".join(f"{ld.name}: {ld.description}" for ld in registry.loaders)
    raise UsageError(f"slimc does not know how to load {model!r}{_why_not_loadable(model)}.",
                     hint=f"MODEL may be one of — {forms}.")


def _why_not_loadable(model: str) -> str:
    """What is wrong with a MODEL that names a path, so the error says "does not exist" or
    "has no config.json" instead of only listing the forms a loader accepts."""
    path = Path(model)
    if ":" in model and not path.exists():
        return ""  # a module:factory form that no loader accepted: the forms say enough
    if not path.exists():
        return f": {str(path)!r} does not exist (check the path)"
    if path.is_dir():
        return f": the folder {str(path)!r} has no config.json and no model weights"
    return f": {path.suffix or 'a file without an extension'!s} is not a model format it reads"


def load_model(model: str, overrides: dict[str, InputOverride] | None = None,
               registry: Registry | None = None, *,
               trust_remote_code: bool = False,
               default_sequence: str | None = None) -> LoadedModel:
    """Find the loader for ``model`` and load it (no capture yet).

    ``trust_remote_code`` lets a loader run code shipped with the model (Hugging Face
    ``auto_map``); loaders read it from :data:`slimc.loaders.base.trust_remote_code`.
    ``default_sequence`` (``"fixed"``/``"dynamic"``, None: the default) is the sequence length
    a text model gets when no ``--input`` shapes it (:data:`~slimc.loaders.base.DEFAULT_SEQUENCE`).
    """
    loader = find_loader(model, registry)
    token = TRUST_REMOTE_CODE.set(trust_remote_code)
    seq_token = DEFAULT_SEQUENCE.set(default_sequence)
    try:
        with _quiet_torch():
            return loader.load(model, overrides or {})
    finally:
        DEFAULT_SEQUENCE.reset(seq_token)
        TRUST_REMOTE_CODE.reset(token)


def capture(loaded: LoadedModel) -> tuple[IR, list[torch.Tensor]]:
    """Export ``loaded`` to an IR; returns the IR and example inputs in IR input order."""
    if loaded.program is not None:
        _check_tensor_outputs(loaded.program, loaded.name)
        ir = loaded.extra.get("ir") or IR(loaded.program, name=loaded.name,
                                          output_names=_output_names(loaded.program))
        inputs = [random_tensor(s.name, s.shape, getattr(torch, s.dtype))
                  for s in ir.input_specs()]
        return ir, inputs
    assert loaded.module is not None
    _compute_in_float32(loaded)
    names = list(loaded.example_inputs)
    values = list(loaded.example_inputs.values())
    args, kwargs = ((), dict(loaded.example_inputs)) if loaded.as_kwargs else (tuple(values), {})
    dynamic = dynamic_shapes(loaded)
    # torch prints the partial graph of a failed export to sys.stderr; slimc reports it itself
    with _quiet_torch(), contextlib.redirect_stderr(io.StringIO()):
        try:
            with torch.no_grad():  # grad-mode switches inside forward would become HOPs
                program = torch.export.export(loaded.module, args, kwargs, strict=False,
                                              dynamic_shapes=dynamic)
        except Exception as exc:  # noqa: BLE001 - translated below
            if not loaded.extra.get("default_sequence") == "dynamic":
                raise _explain_export_failure(loaded, exc) from None
            # The dynamic length was slimc's default, not the user's request: a model that
            # fixes its length still compiles, at the example length, as it did before.
            reason = _explain_export_failure(loaded, exc).message[:300]
            loaded.dynamic = {}
            loaded.extra["default_sequence"] = f"fixed (a dynamic length failed: {reason})"
            return capture(loaded)
    value_sized = _value_dependent_shape(program) if loaded.dynamic else None
    if value_sized is not None:
        if loaded.extra.get("default_sequence") == "dynamic":
            # as above: slimc chose the dynamic length, so the example length still compiles
            loaded.dynamic = {}
            loaded.extra["default_sequence"] = (
                f"fixed (a dynamic length makes a tensor's size depend on tensor values, at "
                f"{value_sized})")
            return capture(loaded)
        raise CaptureError(
            f"Under the dynamic dimensions asked for, a tensor in {loaded.name!r} takes its size "
            f"from tensor *values* (.item() or similar), at {value_sized}. slimc compiles sizes "
            "that follow from the input shapes only.",
            hint="Give the inputs fixed shapes (e.g. --input input_ids=1x128:int64), or "
            "compute that size from x.shape instead of from a tensor.")
    _check_tensor_outputs(program, loaded.name)
    program = _decompose_recurrences(program)
    ir = IR(program, name=loaded.name, input_names=names, output_names=_output_names(program))
    if loaded.dynamic:
        ir.annotations["symbols"] = _symbol_names(ir, loaded)
        ir.freeze_dims()
    # Falcon-style ``x @ W.T`` becomes ``linear(x, W)``: exact, and what every pass knows.
    linearize_weight_matmuls(ir)
    ir.annotations["source"] = {"model": loaded.source, "loader": loaded.kind, **{
        k: v for k, v in loaded.extra.items() if isinstance(v, (str, int, float)) or v is None}}
    return ir, values


#: Floating dtypes whose models slimc computes in float32 (see :func:`_compute_in_float32`).
_CONVERTED_FLOATS = (torch.float16, torch.bfloat16, torch.float64)


def _compute_in_float32(loaded: LoadedModel) -> None:
    """Give ``loaded`` a float32 copy of a float16/bfloat16/float64 module, and float32 inputs.

    TVM 0.27's importer emits every matmul, linear and convolution with a float32 result, so a
    ``model.half()`` or ``model.double()`` failed to import (its float16 bias met a float32
    product), and numpy has no bfloat16 for a bf16 model's inputs and outputs. float32 is at
    least as accurate as float16/bfloat16, and float64 models compiled to float32 keep ~1e-7
    relative accuracy; the conversion is recorded (``model.converted_dtype`` in the manifest)
    and warned about, and the artifact takes and returns float32 tensors.
    """
    assert loaded.module is not None
    tensors = list(loaded.module.parameters()) + list(loaded.module.buffers())
    found = {t.dtype for t in tensors} | {v.dtype for v in loaded.example_inputs.values()}
    converted = sorted(str(d).removeprefix("torch.") for d in found if d in _CONVERTED_FLOATS)
    if not converted:
        return
    # a copy: slimc.compile(module, ...) must not change the caller's model
    loaded.module = copy.deepcopy(loaded.module).float()
    loaded.example_inputs = {k: v.float() if v.dtype in _CONVERTED_FLOATS else v
                             for k, v in loaded.example_inputs.items()}
    loaded.extra["converted_dtype"] = (f"{'/'.join(converted)} -> float32: the artifact "
                                       "computes, takes and returns float32")


def _recurrent_ops() -> set:
    """GRU / Elman RNN ops. TVM 0.27's converter for ``aten.gru.input`` yields only the output
    sequence, not ``(output, h_n)``; the import avoids it only while ``from_exported_program``
    re-runs torch's decompositions. Decomposing at capture makes that independent of TVM and
    lets the passes see the linears. ``aten.lstm.input`` imports correctly and stays."""
    aten = torch.ops.aten
    return {aten.gru.input, aten.gru.data, aten.rnn_tanh.input, aten.rnn_tanh.data,
            aten.rnn_relu.input, aten.rnn_relu.data}


def _decompose_recurrences(program):
    """``program`` with every GRU / Elman RNN op decomposed by torch (unchanged without one)."""
    from torch._decomp import decomposition_table

    ops = _recurrent_ops()
    present = {n.target for n in program.graph.nodes if n.op == "call_function"} & ops
    if not present:
        return program
    with _quiet_torch(), contextlib.redirect_stderr(io.StringIO()):
        return program.run_decompositions({op: decomposition_table[op] for op in present})

def _value_dependent_shape(program) -> str | None:
    """Where a tensor's shape holds an *unbacked* symbol (a size read from tensor values, e.g.
    ``x[a.item():]``), as ``file:line: code`` of the model's source; None when every size
    follows from the input shapes.

    torch.export traces such graphs, but TVM's importer cannot: DeBERTa's relative-position
    span ``min(seq, max_relative_positions)`` goes through ``torch.tensor(...).item()`` under a
    dynamic length (it is a constant at a fixed one), which failed as "cannot lower op(s)
    sym_not, sym_min, sym_storage_offset".
    """
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    for node in program.graph.nodes:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not free_unbacked_symbols(val.shape):
            continue
        frames = [ln.strip() for ln in (node.meta.get("stack_trace") or "").splitlines()
                  if ln.strip()]
        return " ".join(frames[-2:]) if frames else node.name
    return None


def _check_tensor_outputs(program, name: str) -> None:
    """slimc compiles tensor-in, tensor-out graphs: a string, number or None among the outputs
    has no place in a compiled library."""
    from torch.export.graph_signature import OutputKind, TensorArgument

    names = _output_names(program)
    user = [s for s in program.graph_signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    for i, spec in enumerate(user):
        if not isinstance(spec.arg, TensorArgument):
            label = names[i] if names and i < len(names) else f"#{i}"
            value = getattr(spec.arg, "value", spec.arg)
            raise CaptureError(f"Output {label} of {name!r} is not a tensor ({value!r}); slimc "
                               "compiles models whose outputs are all tensors.",
                               hint="Return only tensors from forward() (wrap the model to drop "
                               "the other outputs).")
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    values = [getattr(a, "meta", {}).get("val") for a in output_node.args[0]]
    user_values = [v for s, v in zip(program.graph_signature.output_specs, values, strict=False)
                   if s.kind == OutputKind.USER_OUTPUT]
    for i, val in enumerate(user_values):
        if isinstance(val, torch.Tensor) and val.dtype in (torch.bfloat16, torch.complex64,
                                                           torch.complex128):
            label = names[i] if names and i < len(names) else f"#{i}"
            raise CaptureError(f"Output {label} of {name!r} is {str(val.dtype)[6:]}, which "
                               "slimc's artifacts do not return: they compute and return "
                               "float32 (and integer/bool) tensors.",
                               hint="Return the output as float32 (end forward() with "
                               ".float()), or drop the cast that changes its dtype.")


def dynamic_shapes(loaded: LoadedModel) -> dict | tuple | None:
    """``torch.export``'s ``dynamic_shapes`` for the loader's dynamic dims (None: all static).

    Dims that share a symbol name share one ``torch.export.Dim``, so torch knows they agree
    (the token ids' and the mask's sequence length).
    """
    if not loaded.dynamic:
        return None
    from torch.export import Dim

    symbols: dict[str, Dim] = {}
    per_input: dict[str, dict[int, Dim] | None] = {}
    for name in loaded.example_inputs:
        axes = loaded.dynamic.get(name) or {}
        for rng in axes.values():
            if rng.name not in symbols:
                symbols[rng.name] = Dim(rng.name, min=rng.min, max=rng.max)
        per_input[name] = {axis: symbols[rng.name] for axis, rng in axes.items()} or None
    return per_input if loaded.as_kwargs else tuple(per_input.values())


def _symbol_names(ir: IR, loaded: LoadedModel) -> dict[str, str]:
    """torch's symbol for each dynamic dim (``s41``) -> the name slimc gave it (``seq``)."""
    names: dict[str, str] = {}
    placeholders = [n for n in ir.nodes("placeholder") if ir._is_user_input(n)]
    for input_name, node in zip(ir.input_names, placeholders, strict=True):
        shape = node.meta["val"].shape
        for axis, rng in (loaded.dynamic.get(input_name) or {}).items():
            dim = shape[axis]
            if isinstance(dim, torch.SymInt):
                names[str(dim.node.expr)] = rng.name
    return names


@contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch logs graph dumps and tracebacks while export or loading fails; slimc reports the
    failure itself, in one paragraph."""
    names = {"torch", "torch.fx", "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
             "torch.export", "torch._export"}
    names |= {n for n in logging.root.manager.loggerDict if n.startswith("torch")}
    loggers = [logging.getLogger(n) for n in sorted(names)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # including logger.exception tracebacks: the failure is reported once
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _user_location(exc: BaseException) -> str | None:
    """The model-code line that triggered the failure: from torch's message, else the traceback."""
    matches = list(_USER_FRAME.finditer(str(exc)))
    if matches:
        m = matches[-1]
        return f"{m['file']}:{m['line']} in {m['fn']}: {m['code'].strip()}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not any(s in f.filename for s in _TORCH_INTERNAL)]
    if frames:
        f = frames[-1]
        return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
    return None


def _explain_export_failure(loaded: LoadedModel, exc: BaseException) -> CaptureError:
    text = str(exc).strip()
    headline = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    where = _user_location(exc)
    op = re.search(r"(aten\.[\w.]+|torch\.ops\.[\w.]+)", text)
    kind = type(exc).__name__
    if "data-dependent" in text or "GuardOnDataDependent" in kind:
        what_to_try = ("The model branches on or sizes a tensor by the *values* of a tensor. "
                       "Rewrite that line with torch.where/torch.cond, or move the decision out "
                       "of forward().")
    elif "Dynamic" in kind or "ConstraintViolation" in kind or "specialized" in text:
        what_to_try = ("The model fixes a dimension that was asked to be dynamic (LO..HI); "
                       "give it a fixed size or the bounds torch names, e.g. --input "
                       "input_ids=1x128:int64.")
    elif ".numpy()" in text or ".item()" in text or ".tolist()" in text:
        what_to_try = ("Leaving torch (numpy()/item()/tolist()) cannot be traced; keep the "
                       "computation in torch ops.")
    else:
        what_to_try = ("Check that forward() uses only torch operations on its tensor inputs; "
                       "torch.export.draft_export(model, args) lists every problem at once.")
    parts = [f"Could not capture {loaded.name!r} with torch.export: {headline} ({kind})."]
    if op:
        parts.append(f"Failing op: {op.group(1)}.")
    if where:
        parts.append(f"At {where}.")
    return CaptureError(" ".join(parts), hint=what_to_try)
