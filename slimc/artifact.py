"""The output directory: ``model.so`` + ``manifest.json`` + ``report.md`` (+ inputs, IR).

It is assembled in a hidden sibling folder and moved into place with renames, so a reader never
sees a half-written artifact and a failed compile never destroys the previous one.
:func:`load` re-checks the library's sha256 against the manifest before running anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from slimc.errors import SlimcError, UsageError
from slimc.manifest import (
    MANIFEST,
    check_input_range,
    checked_library,
    sha256_of,
    validate_manifest,
)

__all__ = ["MANIFEST", "LIBRARY", "REPORT", "EXAMPLE_INPUTS", "sha256_of", "staged_directory",
           "write_json", "read_manifest", "CompiledModel", "load"]
LIBRARY = "model.so"
REPORT = "report.md"
EXAMPLE_INPUTS = "example_inputs.npz"
#: Wall-clock times of the compile: kept out of the manifest so that the same inputs give a
#: byte-identical manifest (and cache hits are indistinguishable from cold compiles).
TIMINGS = "timings.json"


@contextmanager
def staged_directory(final: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a scratch folder next to ``final``; on success, swap it in atomically.

    ``final`` must be empty, missing or an artifact slimc wrote (see :mod:`slimc.outdir`); the
    manifest in the scratch folder gets the list of files slimc wrote (``files``), which is how
    a later compile recognises the directory. A signal received at any point (even one whose
    exception native code swallowed) stops the swap; the scratch folder is always removed.
    """
    from slimc import interrupts, outdir

    final = outdir.check_output_directory(final, force=force)
    final.parent.mkdir(parents=True, exist_ok=True)
    outdir.clean_stale_staging(final)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".partial",
                                  dir=final.parent))
    interrupts.register_staging(stage)
    try:
        yield stage
        manifest_path = stage / MANIFEST
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            manifest["files"] = [f for f in outdir.list_files(stage) if f != MANIFEST]
            write_json(manifest_path, manifest)
        with interrupts.commit_lock:
            interrupts.check()
            outdir.check_output_directory(final, force=force)  # it may have changed meanwhile
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
        interrupts.unregister_staging(stage)


#: Fields that depend on the clock or the machine's load (an emulator's time budget scales with
#: the load average), wherever they appear in a manifest.
WALL_CLOCK_KEYS = frozenset({"seconds", "run_budget"})


def split_timings(manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``manifest`` without wall-clock times, and those times: the top-level ``timings`` plus
    every ``seconds`` / ``run_budget`` field anywhere (per pass, per criterion, emulator
    budget), keyed by its JSON path."""
    found: dict[str, Any] = {}

    def strip(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            kept = {}
            for key, item in value.items():
                if key in WALL_CLOCK_KEYS or (key == "timings" and not path):
                    found[f"{path}{key}" if not path else f"{path}.{key}"] = item
                else:
                    kept[key] = strip(item, f"{path}.{key}" if path else str(key))
            return kept
        if isinstance(value, list):
            return [strip(item, f"{path}.{i}") for i, item in enumerate(value)]
        return value

    clean = strip(manifest, "")
    stages = found.pop("timings", {})
    return clean, {"stages": stages, "elsewhere": found}


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise UsageError(f"{directory} is not a slimc artifact (no {MANIFEST}).",
                         hint="Pass the directory `slimc compile` wrote (-o).")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is corrupt ({exc}).",
                         hint="Recompile the model to regenerate the artifact.") from None
    validate_manifest(data, path)
    return data


class CompiledModel:
    """A loaded artifact: call it with arrays (positionally or by input name).

    Returns a dict of output name -> numpy array. Cross-compiled artifacts run under qemu when
    ``emulate=True`` (slow; for checking, not serving).
    """

    def __init__(self, directory: str | os.PathLike[str], *, threads: int | None = None,
                 emulate: bool = False, rpc: str | None = None) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.library = checked_library(self.directory,
                                       validate_manifest(self.manifest, self.directory / MANIFEST))
        self.inputs = self.manifest["inputs"]
        self.outputs = self.manifest["outputs"]
        self.cross_triple = self.manifest["target"].get("cross_triple")
        self.threads = threads
        if rpc:  # runs on the device behind a TVM RPC server, whatever this machine is
            from slimc.backends.tvm.rpc_runner import RpcRunner

            self._runner = RpcRunner(self.library, rpc)
            return
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
        except SlimcError:
            raise
        except Exception as exc:  # noqa: BLE001 - dlopen/VM errors of a foreign library
            raise UsageError(f"Cannot load {self.library}: {type(exc).__name__}: "
                             f"{_first_line(exc)}", hint="Recompile the model on this "
                             "machine's slimc/TVM.") from None
        arity = getattr(self._runner, "arity", lambda: None)()
        if arity is not None and arity != len(self.inputs):
            raise UsageError(f"{MANIFEST} lists {len(self.inputs)} input(s) but "
                             f"{self.library.name} takes {arity}; the manifest was edited "
                             "or belongs to another library.", hint="Recompile the model.")

    def _arrange(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[np.ndarray]:
        from slimc.feeds import arrange

        arrays = arrange(self.inputs, args, kwargs)
        for spec, array in zip(self.inputs, arrays, strict=True):
            check_input_range(spec, array)
        return arrays

    def run_arrays(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self._runner(arrays)

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        if self.manifest.get("generation"):
            raise UsageError(f"{self.directory} is a generation artifact (prefill/decode entry "
                             "points), not a single forward pass.",
                             hint="Call model.generate(prompt, max_new_tokens) or `slimc "
                             "generate`.")
        """Run on arrays (by position or name), a tokenizer's output (a mapping, also as the
        one positional argument), or text: ``model("a sentence")`` / ``model([...])``."""
        if len(args) == 1 and not kwargs and _is_text(args[0]):
            return self._run_texts([args[0]] if isinstance(args[0], str) else list(args[0]))
        if len(args) == 1 and isinstance(args[0], Mapping):
            args, kwargs = (), {**args[0], **kwargs}
        arrays = self._arrange(args, kwargs)
        try:
            outputs = self.run_arrays(arrays)
        except (KeyboardInterrupt, SlimcError):
            raise
        except Exception as exc:  # noqa: BLE001 - the library's own argument checks
            raise UsageError(f"{self.library.name} rejected the inputs: {type(exc).__name__}: "
                             f"{_first_line(exc)}", hint=f"The artifact's {MANIFEST} may not "
                             "match its library; recompile the model.") from None
        if len(outputs) != len(self.outputs):
            raise UsageError(f"{self.library.name} returned {len(outputs)} output(s) but "
                             f"{MANIFEST} lists {len(self.outputs)}; the manifest was edited.",
                             hint="Recompile the model.")
        return {spec["name"]: out for spec, out in zip(self.outputs, outputs, strict=True)}

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 32, **options: Any):
        """Generate text (or token ids) with a ``--generate`` artifact; see
        :func:`slimc.generation.session.generate` for the sampling options."""
        from slimc.generation.session import generate

        return generate(self, prompt, max_new_tokens, **options)

    def generator(self):
        """The host generation loop over this artifact's VM (one KV cache, reused)."""
        if getattr(self, "_generator", None) is None:
            from slimc.generation.loop import Generator

            vm = getattr(self._runner, "pinned_vm", None) or getattr(self._runner, "vm", None)
            if vm is None:
                raise UsageError(f"{self.directory} cannot run generation in this process.",
                                 hint="Load it with emulate=True (cross targets) or on a "
                                 "machine of its target.")
            device = getattr(self._runner, "device", None)
            on_device = device is not None and device.dlpack_device_type() != 1  # not kDLCPU
            self._generator = Generator(vm, self.manifest["generation"],
                                        device=device if on_device else None)
        return self._generator

    def tokenizer(self):
        """The tokenizer shipped in the artifact."""
        name = self.manifest.get("tokenizer")
        if not name:
            raise UsageError(f"{self.directory} has no tokenizer (the model directory had "
                             "none).", hint="Give token ids instead of text (slimc generate "
                             "--prompt-ids 1,2,3; a list of ints in Python).")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.directory / name))

    def encode(self, texts: str | Sequence[str]) -> np.ndarray:
        """Sentence embeddings of ``texts`` (one row per text), as sentence-transformers'
        ``encode``: the ``sentence_embedding`` output when the artifact has pooling compiled
        in, else its first output."""
        rows = [texts] if isinstance(texts, str) else list(texts)
        outputs = self._run_texts(rows)
        name = "sentence_embedding" if "sentence_embedding" in outputs else self.outputs[0]["name"]
        return outputs[name]

    def _run_texts(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Tokenize ``texts`` together (one padding) and run them; an artifact with a fixed
        batch runs them in chunks of that batch, concatenated along the batch axis."""
        from slimc.feeds import sequence_bounds

        if not texts:
            raise UsageError("No texts given.")
        specs = {s["name"]: s for s in self.inputs}
        batch = sequence_bounds(specs["input_ids"])[0] if "input_ids" in specs else None
        if batch is None or batch == len(texts):
            return self(**self.tokenize(texts))
        feed = self._tokenize_rows(texts)
        chunks = []
        for start in range(0, len(texts), batch):
            rows = list(range(start, min(start + batch, len(texts))))
            rows += [rows[-1]] * (batch - len(rows))  # fill the last chunk; dropped below
            out = self(**{k: v[rows] for k, v in feed.items()})
            chunks.append({k: v[:min(batch, len(texts) - start)] for k, v in out.items()})
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def example_inputs(self) -> dict[str, np.ndarray]:
        """The inputs the artifact was verified on at compile time."""
        path = self.directory / EXAMPLE_INPUTS
        try:
            with np.load(path, allow_pickle=False) as data:
                return {spec["name"]: data[spec["name"]] for spec in self.inputs}
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise UsageError(f"{path} is missing or unreadable ({type(exc).__name__}: {exc}).",
                             hint="Give every input with --input NAME=file.npy, or recompile "
                             "the model.") from None

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Token inputs for ``texts`` with the tokenizer shipped in the artifact: padded to the
        longest text (truncated at the bound) for a dynamic sequence length, else padded or
        truncated to the compiled one. A fixed batch of B takes 1 text (repeated) or B."""
        from slimc.feeds import sequence_bounds

        specs = {s["name"]: s for s in self.inputs}
        batch = sequence_bounds(specs["input_ids"])[0] if "input_ids" in specs else None
        texts = [texts] if isinstance(texts, str) else list(texts)
        if batch is not None and len(texts) not in (1, batch):
            raise UsageError(f"The artifact was compiled for batch {batch}; give 1 or {batch} "
                             f"texts, not {len(texts)}.")
        rows = texts * (batch if batch is not None and len(texts) == 1 else 1)
        return self._tokenize_rows(rows)

    def _tokenize_rows(self, rows: list[str]) -> dict[str, np.ndarray]:
        """One tokenizer call over ``rows``: one padding for all of them."""
        name = self.manifest.get("tokenizer")
        if not name:
            raise UsageError(f"{self.directory} has no tokenizer (the model directory had "
                             "none); give token ids with --input instead.")
        from transformers import AutoTokenizer

        from slimc.feeds import sequence_bounds

        specs = {s["name"]: s for s in self.inputs}
        if "input_ids" not in specs:
            raise UsageError("Text input needs a model with an input_ids input.")
        _, seq, dynamic = sequence_bounds(specs["input_ids"])
        trained = self.manifest.get("model", {}).get("max_seq_length")
        if trained and dynamic:  # sentence-transformers truncates there too
            seq = min(seq or trained, trained)
        tokenizer = AutoTokenizer.from_pretrained(str(self.directory / name),
                                                  trust_remote_code=False)
        padding = "longest" if dynamic else "max_length"
        encoded = tokenizer(rows, padding=padding, truncation=seq is not None, max_length=seq,
                            return_tensors="np")
        feed = {} if dynamic else self.example_inputs()
        for key, value in encoded.items():
            if key in specs:
                feed[key] = value.astype(specs[key]["dtype"])
        return feed

    def __repr__(self) -> str:
        return (f"CompiledModel({str(self.directory)!r}, target="
                f"{self.manifest['target']['name']!r})")


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _is_text(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and bool(value)
                                      and all(isinstance(v, str) for v in value))


def load(directory: str | os.PathLike[str], *, threads: int | None = None,
         emulate: bool = False, rpc: str | None = None) -> CompiledModel:
    """Load an artifact written by ``slimc compile``; returns a callable."""
    return CompiledModel(directory, threads=threads, emulate=emulate, rpc=rpc)
