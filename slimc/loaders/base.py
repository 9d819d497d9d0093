"""The loader contract and the ``--input NAME=SHAPE:DTYPE`` syntax shared by every loader."""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch.export import ExportedProgram

from slimc.errors import UsageError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
#: Whether a loader may run code shipped with the model (``--trust-remote-code``); set by
#: :func:`slimc.capture.load_model` for the duration of one load. Default: never.
TRUST_REMOTE_CODE: ContextVar[bool] = ContextVar("slimc_trust_remote_code", default=False)

_SPEC = re.compile(r"^(?P<name>[A-Za-z_][\w.]*)=(?P<shape>\d+(?:x\d+)*)?(?::(?P<dtype>\w+))?$")


@dataclass(frozen=True)
class InputOverride:
    """One ``--input NAME=SHAPE:DTYPE`` option; shape or dtype may be left out."""

    name: str
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None

    @classmethod
    def parse(cls, text: str) -> InputOverride:
        match = _SPEC.match(text.strip())
        if not match or not (match["shape"] or match["dtype"]):
            raise UsageError(
                f"--input {text!r} is not of the form NAME=SHAPE:DTYPE.",
                hint="Example: --input input_ids=1x128:int64 (dims joined by 'x'; "
                f"dtypes: {', '.join(sorted(set(_DTYPES)))}).",
            )
        dtype = None
        if match["dtype"]:
            dtype = _DTYPES.get(match["dtype"].lower())
            if dtype is None:
                raise UsageError(
                    f"--input {text!r}: unknown dtype {match['dtype']!r}.",
                    hint=f"Use one of: {', '.join(sorted(_DTYPES))}.",
                )
        shape = tuple(int(d) for d in match["shape"].split("x")) if match["shape"] else None
        if shape is not None and any(d <= 0 for d in shape):
            raise UsageError(f"--input {text!r}: every dimension must be positive.")
        return cls(match["name"], shape, dtype)


def parse_overrides(texts: list[str] | tuple[str, ...]) -> dict[str, InputOverride]:
    overrides: dict[str, InputOverride] = {}
    for text in texts:
        ov = InputOverride.parse(text)
        if ov.name in overrides:
            raise UsageError(f"--input {ov.name} is given twice.")
        overrides[ov.name] = ov
    return overrides


@dataclass
class LoadedModel:
    """A model ready for capture: an eval-mode module plus named example inputs, or a program
    that is already exported (``.pt2``)."""

    name: str
    module: torch.nn.Module | None = None
    example_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Pass the inputs as keyword arguments (HF models) rather than positionally.
    as_kwargs: bool = False
    program: ExportedProgram | None = None
    #: Where the model came from, for the manifest.
    source: str = ""
    kind: str = ""
    #: Anything a later stage may want (tokenizer path, config); JSON-serializable.
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Loader(Protocol):
    """Recognises one spelling of MODEL and loads it."""

    name: str
    description: str

    def accepts(self, model: str) -> bool:
        """True when this loader knows how to load ``model``; cheap, no heavy imports."""
        ...

    def load(self, model: str, overrides: dict[str, InputOverride]) -> LoadedModel:
        """Load the model and build example inputs (honouring ``--input`` overrides)."""
        ...


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype,
                  *, high: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """A plausible example value for an input: ones for masks, ids below ``high``, else normal."""
    g = generator or torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    if not dtype.is_floating_point:
        if "mask" in name:
            return torch.ones(shape, dtype=dtype)
        if "type_ids" in name:
            return torch.zeros(shape, dtype=dtype)
        return torch.randint(0, max(high, 1), shape, generator=g, dtype=dtype)
    return torch.randn(shape, generator=g).to(dtype)


def apply_overrides(inputs: dict[str, torch.Tensor], overrides: dict[str, InputOverride],
                    *, accepted: list[str], high: int = 2) -> dict[str, torch.Tensor]:
    """Re-shape/re-type named example inputs; unknown names are an error naming valid ones."""
    result = dict(inputs)
    for ov in overrides.values():
        if ov.name not in accepted:
            raise UsageError(
                f"--input {ov.name}: the model has no input of that name.",
                hint=f"Its inputs are: {', '.join(accepted)}.",
            )
        old = result.get(ov.name)
        shape = ov.shape or (tuple(old.shape) if old is not None else None)
        if shape is None:
            raise UsageError(f"--input {ov.name} needs a shape (e.g. {ov.name}=1x128:int64).")
        dtype = ov.dtype or (old.dtype if old is not None else torch.float32)
        result[ov.name] = random_tensor(ov.name, shape, dtype, high=high)
    # Keep the model's own argument order.
    return {k: result[k] for k in accepted if k in result}
