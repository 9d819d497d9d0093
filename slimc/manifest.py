"""``manifest.json`` is input from a stranger: validate it before anything in it is used.

An artifact directory may have been copied, edited or crafted, so :func:`validate_manifest`
checks every field the loader reads (with pydantic, one error paragraph naming the field), and
:func:`checked_library` only accepts a ``library`` that is a plain file name inside the artifact
(no ``..``, no absolute path, no symlink) whose size and sha256 match the manifest, before the
library is handed to ``dlopen``: a truncated or replaced ``model.so`` is refused instead of
crashing the process with SIGBUS or running someone else's code.

Integer inputs carry their valid range (``min``/``max``, e.g. ``0 .. vocab_size - 1`` for token
ids feeding an embedding): :func:`check_input_range` rejects ids outside it before the library
runs. The library itself also clamps every gather index (see ``docs/reliability.md``), so a
C/C++ caller that skips this check still cannot read outside the table.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slimc.errors import UsageError

MANIFEST = "manifest.json"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
           "uint8", "bool"}


def is_plain_name(name: str) -> bool:
    """A file name with no directory part, not hidden, not ``.``/``..``."""
    return bool(_PLAIN_NAME.match(name)) and name not in (".", "..")


class TensorEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    shape: list[int]
    dtype: str
    #: Smallest / largest valid value of an integer input (token ids: 0 .. vocab - 1).
    min: int | None = None
    max: int | None = None

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int]) -> list[int]:
        if any(d < 0 for d in shape):
            raise ValueError("dimensions must be non-negative")
        return shape

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, dtype: str) -> str:
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype (one of {', '.join(sorted(_DTYPES))})")
        return dtype


class TargetEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    cross_triple: str | None = None
    backend: str | None = None


class Manifest(BaseModel):
    """The fields of ``manifest.json`` that loading and running an artifact depend on."""

    model_config = ConfigDict(extra="allow")

    slimc_version: str
    library: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    library_bytes: int | None = Field(default=None, ge=0)
    inputs: list[TensorEntry]
    outputs: list[TensorEntry]
    target: TargetEntry
    tokenizer: str | None = None
    files: list[str] | None = None

    @field_validator("library")
    @classmethod
    def _library(cls, name: str) -> str:
        if not is_plain_name(name):
            raise ValueError("must be a plain file name inside the artifact directory")
        return name

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, name: str | None) -> str | None:
        if name is not None and not is_plain_name(name):
            raise ValueError("must be a plain folder name inside the artifact directory")
        return name


def validate_manifest(data: Any, path: Path) -> Manifest:
    """Parsed ``manifest.json`` -> :class:`Manifest`, or a UsageError naming the bad field."""
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in exc.errors()[:5])
        raise UsageError(f"{path} is not a valid slimc manifest ({problems}).",
                         hint="The artifact was edited, truncated or not written by slimc; "
                         "recompile the model to regenerate it.") from None


def sha256_of(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checked_library(directory: Path, manifest: Manifest) -> Path:
    """The artifact's library, after proving it is a regular file inside ``directory`` with the
    recorded size and sha256 (checked before dlopen, which would SIGBUS on a truncated file)."""
    path = directory / manifest.library
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise UsageError(f"{path} is missing from the artifact.",
                         hint="Recompile the model.") from None
    if not stat.S_ISREG(info.st_mode) or path.resolve().parent != directory.resolve():
        raise UsageError(f"{path} is not a regular file inside {directory} (a symlink or "
                         "special file); slimc only loads the library the artifact holds.",
                         hint="Recompile the model.")
    if manifest.library_bytes is not None and info.st_size != manifest.library_bytes:
        raise UsageError(f"{path} has {info.st_size} bytes but {MANIFEST} records "
                         f"{manifest.library_bytes}; the library is truncated or was replaced.",
                         hint="Recompile the model, or copy the artifact again.")
    if sha256_of(path) != manifest.sha256:
        raise UsageError(f"{path} does not match the sha256 in {MANIFEST}; the library is "
                         "corrupt or was replaced.", hint="Recompile the model.")
    return path


def check_input_range(spec: dict[str, Any], array: np.ndarray) -> None:
    """Reject integer values outside the input's recorded ``min``/``max`` (token ids beyond the
    vocabulary would otherwise read past the embedding table)."""
    lo, hi = spec.get("min"), spec.get("max")
    if (lo is None and hi is None) or array.size == 0 or array.dtype.kind not in "iub":
        return
    bad = np.zeros(array.shape, dtype=bool)
    if lo is not None:
        bad |= array < lo
    if hi is not None:
        bad |= array > hi
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        value = array[where]
        raise UsageError(
            f"Input {spec['name']} holds {value} at position {list(where)}, outside its valid "
            f"range {lo} .. {hi} ({int(bad.sum())} value(s) out of range).",
            hint=f"Token ids must be below the vocabulary size ({hi + 1 if hi is not None else '?'}"
            "); use the model's own tokenizer.")
