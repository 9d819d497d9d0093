"""Load ``.pt2`` archives without ever running pickle code from them.

A ``.pt2`` written by ``torch.export.save`` is a zip of JSON (graph, payload configs) and raw
tensor bytes, but its format also allows pickled payloads: weights or constants marked
``use_pickle`` and legacy ``.pt`` weight files are read with ``torch.load(weights_only=False)``,
custom/opaque objects with ``pickle.loads``, and sample inputs fall back to
``weights_only=False`` when the safe load fails. Unpickling runs arbitrary code, so slimc:

1. inspects the zip before ``torch.export.load`` and refuses any pickled payload
   (:func:`check_archive`); tensors saved by ``torch.export.save`` from plain modules never are;
2. loads with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` (:func:`weights_only_loads`), so any
   ``torch.load`` torch still makes inside (sample inputs) cannot run code either.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slimc.errors import UsageError

_FIX = ("Re-export the model from its source with torch.export.save(torch.export.export(model, "
        "args), path), using plain tensors as weights.")


def _refuse(path: Path, what: str) -> UsageError:
    return UsageError(f"{path} contains {what}; loading it would run pickle code from the "
                      "file, which slimc never does.", hint=_FIX)


def check_archive(path: str | os.PathLike[str]) -> None:
    """Raise a UsageError if the archive at ``path`` holds any payload that torch would unpickle
    with ``weights_only=False`` (or with plain ``pickle``)."""
    from torch.export.pt2_archive.constants import (
        CONSTANTS_DIR,
        TENSOR_CONSTANT_FILENAME_PREFIX,
        WEIGHTS_DIR,
    )

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            configs = {n: archive.read(n) for n in names if n.endswith("_config.json")
                       and (f"/{WEIGHTS_DIR}" in f"/{n}" or f"/{CONSTANTS_DIR}" in f"/{n}")}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UsageError(f"{path} is not a readable torch.export archive ({exc}).",
                         hint=_FIX) from None
    for name in names:
        parent = posixpath.dirname(name) + "/"
        if name.endswith(".pt") and (parent.endswith(WEIGHTS_DIR) or
                                     parent.endswith(CONSTANTS_DIR)):
            raise _refuse(path, f"a legacy pickled payload ({name})")
    for name, raw in configs.items():
        try:
            entries = json.loads(raw).get("config", {})
        except (ValueError, AttributeError):
            raise UsageError(f"{path}: {name} is not valid JSON.", hint=_FIX) from None
        if not isinstance(entries, dict):
            raise UsageError(f"{path}: {name} is malformed.", hint=_FIX)
        is_constants = f"/{CONSTANTS_DIR}" in f"/{name}"
        for fqn, meta in entries.items():
            if not isinstance(meta, dict):
                raise UsageError(f"{path}: {name} entry {fqn!r} is malformed.", hint=_FIX)
            if meta.get("use_pickle"):
                raise _refuse(path, f"a pickled payload for {fqn!r} ({name})")
            if is_constants and not str(meta.get("path_name", "")).startswith(
                    TENSOR_CONSTANT_FILENAME_PREFIX):
                raise _refuse(path, f"a pickled custom object {fqn!r} ({name})")


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Force every ``torch.load`` in the block to ``weights_only=True`` (torch honours this
    environment variable even where the caller passes ``weights_only=False``)."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    saved = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


@contextmanager
def captured_torch_log() -> Iterator[list[str]]:
    """Collect what ``torch.export`` logs while loading (it logs the real cause of a failed
    load, then raises "check the warnings above"), instead of printing it."""
    logger = logging.getLogger("torch.export")
    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.extend(logging.Formatter().format(record).splitlines())

    saved = logger.level, logger.propagate, logger.handlers[:]
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    logger.handlers = [_Collect()]  # torch attaches its own printing handler here
    try:
        yield lines
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers = saved[2]
