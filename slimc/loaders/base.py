"""The loader contract and the ``--input NAME=SHAPE:DTYPE`` syntax shared by every loader."""

from __future__ import annotations

import math
import os
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
#: ``"fixed"`` or ``"dynamic"``: the sequence length a text model gets when ``--input`` gives no
#: shape (None: the loader's default, see ``slimc.loaders.huggingface.default_sequence``).
#: ``slimc analyze`` and ``--generate`` set ``"fixed"`` (their graphs are measured, or cached,
#: at one length).
DEFAULT_SEQUENCE: ContextVar[str | None] = ContextVar("slimc_default_sequence", default=None)

_DIM = r"\d+(?:\.\.\d+)?"
_SPEC = re.compile(
    rf"^(?P<name>[A-Za-z_][\w.]*)=(?P<shape>{_DIM}(?:x{_DIM})*)?(?::(?P<dtype>\w+))?$")
#: Example size of a dynamic dimension (clamped into its bounds): batch axes get 2, other axes
#: 128. torch.export specialises sizes 0 and 1, so an example is never below 2.
EXAMPLE_BATCH, EXAMPLE_LENGTH = 2, 128


@dataclass(frozen=True)
class DimRange:
    """A dynamic dimension: its symbol name (shared by dims that must agree) and bounds."""

    name: str
    min: int
    max: int

    def example(self, axis: int, preferred: int | None = None) -> int:
        """The size used to capture and verify: ``preferred`` (else a default) within bounds."""
        want = preferred or (EXAMPLE_BATCH if axis == 0 else EXAMPLE_LENGTH)
        return max(self.min, 2, min(want, self.max))

    def to_json(self) -> dict:
        return {"name": self.name, "min": self.min, "max": self.max}


#: Symbol names slimc gives dynamic dimensions by axis (axis 0 is the batch).
AXIS_SYMBOLS = {0: "batch", 1: "seq"}


@dataclass(frozen=True)
class InputOverride:
    """One ``--input NAME=SHAPE:DTYPE`` option; shape or dtype may be left out.

    A dimension written ``LO..HI`` is dynamic: ``shape`` holds its example size and ``ranges``
    its bounds (None for fixed dims).
    """

    name: str
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    ranges: tuple[DimRange | None, ...] | None = None

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
        if not match["shape"]:
            return cls(match["name"], None, dtype)
        shape: list[int] = []
        ranges: list[DimRange | None] = []
        for axis, dim in enumerate(match["shape"].split("x")):
            low, _, high = dim.partition("..")
            low_i, high_i = int(low), int(high or low)
            if low_i <= 0 or high_i < low_i:
                raise UsageError(
                    f"--input {text!r}: dimension {dim!r} must be positive"
                    + (" with LO <= HI" if high else "") + ".",
                    hint="A dynamic dimension is written LO..HI, e.g. input_ids=1x1..512:int64.")
            if high and high_i > low_i and high_i >= 2:
                rng = DimRange(AXIS_SYMBOLS.get(axis, f"dim{axis}"), low_i, high_i)
                ranges.append(rng)
                shape.append(rng.example(axis))
            else:
                ranges.append(None)
                shape.append(low_i)
        _refuse_huge_example(text, shape, dtype)
        return cls(match["name"], tuple(shape), dtype,
                   tuple(ranges) if any(ranges) else None)


def _physical_memory() -> int:
    """This machine's RAM in bytes (16 GiB when the OS will not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def _refuse_huge_example(text: str, shape: list[int], dtype: torch.dtype | None) -> None:
    """A shape whose example tensor cannot fit in memory (``99999999999x16``) is a typo: refuse
    it here, before torch fails to allocate it deep inside the loader with a traceback. The
    compile holds several copies of each example (eager, IR, the library's run), hence 1/4."""
    itemsize = torch.empty((), dtype=dtype).element_size() if dtype is not None else 4
    nbytes = math.prod(shape) * itemsize
    limit = _physical_memory() // 4
    if nbytes > limit:
        raise UsageError(
            f"--input {text!r}: one example of this shape is {nbytes / 2**30:.3g} GiB, more "
            f"than a quarter of this machine's memory ({limit * 4 / 2**30:.3g} GiB); the "
            "compiler keeps several copies of every example input.",
            hint="Give a smaller shape (is a dimension mistyped?). For a size that varies at "
                 "run time write it LO..HI: the compile then uses a small example within it.")


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
    #: Dynamic dimensions: input name -> {axis: DimRange}; dims sharing a name must agree.
    dynamic: dict[str, dict[int, DimRange]] = field(default_factory=dict)


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
        if name.endswith("position_ids") and len(shape) >= 1:
            return torch.arange(shape[-1], dtype=dtype).expand(shape).contiguous()
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


def dynamic_dims(overrides: dict[str, InputOverride]) -> dict[str, dict[int, DimRange]]:
    """The dynamic dimensions the overrides ask for: input name -> {axis: DimRange}."""
    return {ov.name: {axis: rng for axis, rng in enumerate(ov.ranges) if rng is not None}
            for ov in overrides.values() if ov.ranges}


def agree(overrides: dict[str, InputOverride], group: tuple[str, ...], present: list[str],
          axes: int = 2) -> dict[str, InputOverride]:
    """Make the inputs of ``group`` that are ``present`` agree on their first ``axes`` dims.

    Text models take token ids, an attention mask, token types and position ids of one
    ``[batch, sequence]`` shape: overriding one of them re-shapes the others (keeping their
    dtypes). Two overrides that disagree are an error naming both.
    """
    given = [overrides[n] for n in group if n in overrides and overrides[n].shape]
    if not given:
        return overrides
    leader = given[0]
    lead_shape = leader.shape[:axes]
    lead_ranges = (leader.ranges or (None,) * len(leader.shape))[:axes]
    for ov in given[1:]:
        ranges = (ov.ranges or (None,) * len(ov.shape))[:axes]
        if ov.shape[:axes] != lead_shape or ranges != lead_ranges:
            raise UsageError(
                f"--input {leader.name} and --input {ov.name} disagree on their "
                f"[batch, sequence] dims ({_dims_text(leader)} vs {_dims_text(ov)}).",
                hint=f"Give the same dims to both, or override only {leader.name}: the "
                "others follow it.")
    result = dict(overrides)
    for name in group:
        if name in present and (name not in overrides or not overrides[name].shape):
            dtype = overrides[name].dtype if name in overrides else None
            result[name] = InputOverride(name, lead_shape, dtype,
                                         lead_ranges if any(lead_ranges) else None)
    return result


def _dims_text(ov: InputOverride) -> str:
    ranges = ov.ranges or (None,) * len(ov.shape or ())
    return "x".join(f"{r.min}..{r.max}" if r else str(d)
                    for d, r in zip(ov.shape or (), ranges, strict=True))
