"""The output directory: ``model.so`` + ``manifest.json`` + ``report.md`` (+ inputs, IR).

It is assembled in a hidden sibling folder and moved into place with renames, so a reader never
sees a half-written artifact and a failed compile never destroys the previous one.
:func:`load` re-checks the library's sha256 against the manifest before running anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from slimc.errors import UsageError

MANIFEST = "manifest.json"
LIBRARY = "model.so"
REPORT = "report.md"
EXAMPLE_INPUTS = "example_inputs.npz"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yield a scratch folder next to ``final``; on success, swap it in atomically."""
    final = final.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not (final / MANIFEST).exists() and any(final.iterdir()):
        raise UsageError(f"{final} exists and is not a slimc artifact; slimc will not "
                         "overwrite it.", hint="Choose another -o directory or remove it.")
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield stage
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(stage, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise UsageError(f"{directory} is not a slimc artifact (no {MANIFEST}).",
                         hint="Pass the directory `slimc compile` wrote (-o).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is corrupt ({exc}).",
                         hint="Recompile the model to regenerate the artifact.") from None


class CompiledModel:
    """A loaded artifact: call it with arrays (positionally or by input name).

    Returns a dict of output name -> numpy array. Cross-compiled artifacts run under qemu when
    ``emulate=True`` (slow; for checking, not serving).
    """

    def __init__(self, directory: str | os.PathLike[str], *, threads: int | None = None,
                 emulate: bool = False) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.library = self.directory / self.manifest["library"]
        if not self.library.is_file():
            raise UsageError(f"{self.library} is missing from the artifact.",
                             hint="Recompile the model.")
        if sha256_of(self.library) != self.manifest["sha256"]:
            raise UsageError(f"{self.library} does not match the sha256 in {MANIFEST}; the "
                             "library is corrupt or was replaced.", hint="Recompile the model.")
        self.inputs = self.manifest["inputs"]
        self.outputs = self.manifest["outputs"]
        self.cross_triple = self.manifest["target"].get("cross_triple")
        self.threads = threads
        if self.cross_triple and not emulate:
            raise UsageError(
                f"{self.directory} was built for {self.cross_triple} and cannot run on this "
                "machine.", hint="Copy it to such a device, or load it with emulate=True "
                "(slimc run --emulate) to run it under qemu.")
        from slimc.backend import DeviceUnavailable, get_backend

        target = self.manifest["target"]
        backend = get_backend(target.get("backend") or "tvm-cpu")
        try:
            self._runner = backend.load(self.library, self.manifest, threads, emulate=emulate)
        except DeviceUnavailable as exc:
            raise UsageError(f"{self.directory} was built for {target['name']} and cannot run "
                             f"on this machine: {exc}.", hint="Run it on a machine with that "
                             "device (the artifact is complete; nothing compiles at load "
                             "time).") from None

    def _arrange(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[np.ndarray]:
        names = [i["name"] for i in self.inputs]
        if len(args) > len(names):
            raise UsageError(f"The model takes {len(names)} inputs ({', '.join(names)}), "
                             f"got {len(args)}.")
        values = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in names:
                raise UsageError(f"Unknown input {key!r}; the model's inputs are "
                                 f"{', '.join(names)}.")
            values[key] = value
        missing = [n for n in names if n not in values]
        if missing:
            raise UsageError(f"Missing input(s) {', '.join(missing)}.")
        arrays = []
        for spec in self.inputs:
            value = values[spec["name"]]
            array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
            if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
                raise UsageError(
                    f"Input {spec['name']} has shape {list(array.shape)} and dtype {array.dtype};"
                    f" the artifact was compiled for shape {spec['shape']} and dtype "
                    f"{spec['dtype']}.", hint="Recompile with --input "
                    f"{spec['name']}={'x'.join(map(str, array.shape))}:{array.dtype} or "
                    "reshape the input.")
            arrays.append(np.ascontiguousarray(array))
        return arrays

    def run_arrays(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self._runner(arrays)

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        outputs = self.run_arrays(self._arrange(args, kwargs))
        return {spec["name"]: out for spec, out in zip(self.outputs, outputs, strict=True)}

    def example_inputs(self) -> dict[str, np.ndarray]:
        """The inputs the artifact was verified on at compile time."""
        with np.load(self.directory / EXAMPLE_INPUTS) as data:
            return {spec["name"]: data[spec["name"]] for spec in self.inputs}

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Token inputs for ``texts`` with the tokenizer shipped in the artifact, padded or
        truncated to the compiled sequence length (one text per batch row)."""
        name = self.manifest.get("tokenizer")
        if not name:
            raise UsageError(f"{self.directory} has no tokenizer (the model directory had "
                             "none); give token ids with --input instead.")
        from transformers import AutoTokenizer

        specs = {s["name"]: s for s in self.inputs}
        if "input_ids" not in specs:
            raise UsageError("--text needs a model with an input_ids input.")
        batch, seq = specs["input_ids"]["shape"][:2]
        if len(texts) not in (1, batch):
            raise UsageError(f"The artifact was compiled for batch {batch}; give 1 or {batch} "
                             f"texts, not {len(texts)}.")
        rows = list(texts) * (batch if len(texts) == 1 else 1)
        tokenizer = AutoTokenizer.from_pretrained(str(self.directory / name))
        encoded = tokenizer(rows, padding="max_length", truncation=True, max_length=seq,
                            return_tensors="np")
        feed = self.example_inputs()
        for key, value in encoded.items():
            if key in specs:
                feed[key] = value.astype(specs[key]["dtype"])
        return feed

    def __repr__(self) -> str:
        return (f"CompiledModel({str(self.directory)!r}, target="
                f"{self.manifest['target']['name']!r})")


def load(directory: str | os.PathLike[str], *, threads: int | None = None,
         emulate: bool = False) -> CompiledModel:
    """Load an artifact written by ``slimc compile``; returns a callable."""
    return CompiledModel(directory, threads=threads, emulate=emulate)
