"""The Python API: :func:`compile` (a path, an ``nn.Module`` with example inputs, or an
``ExportedProgram``) and :func:`compile_model`, with the compile cache in front.

This module imports neither torch nor TVM until a compile really has to run: a build system
calling ``slimc compile`` on an unchanged model gets the cached artifact in about a second.
The cache key (:func:`identity`) is computed from the request as given (model files, pipeline
text, recipe file, target name, options, calibration data, tuning database, versions and
slimc's own source), so it needs no plugin registry; it is recorded in the manifest as
``provenance``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from slimc import artifact, provenance
from slimc.errors import UsageError

Stage = Callable[[str], None]


@dataclass
class CompileOptions:
    #: Target name; None: the recipe's ``target``, else ``llvm`` (see :mod:`slimc.recipe`).
    target: str | None = None
    pipeline: str | None = None
    recipe: str | Path | None = None
    #: ``-O`` level: 0, 1, 2, 3 or "s" (see ``slimc compile --help`` and docs/budget.md).
    opt_level: int | str = 0
    inputs: Sequence[str] = ()
    output: str | Path | None = None
    threads: int | None = None
    #: Cores the compiler itself uses (``-j``): torch's threads in passes and the per-layer
    #: W8A8 search workers (:mod:`slimc.jobs`); None: every core. Not the artifact's threads.
    jobs: int | None = None
    #: Largest relative L2 error allowed between the artifact and the IR it was built from.
    verify_tolerance: float = 1e-3
    #: ``auto``: run cross artifacts under emulation when it is available; ``require``: fail if
    #: it is not; ``skip``: never run a cross artifact.
    emulate: Literal["auto", "require", "skip"] = "auto"
    #: Seconds an emulated verification run may take (default: derived from the model's FLOPs
    #: and weight bytes by the backend, see :mod:`slimc.backends.tvm.emulation_budget`).
    emulate_timeout: float | None = None
    save_ir: bool = False
    #: Calibration data for passes that need activations (text, .npy/.npz, image folder).
    calib: str | Path | None = None
    calib_batches: int = 8
    #: MetaSchedule trial budget for the most expensive kernels (0: no tuning; existing records
    #: in the tuning database are applied either way).
    tune: int = 0
    #: Stop tuning after this many minutes.
    tune_minutes: float | None = None
    #: Tuning database folder (default: per target under ``$SLIMC_CACHE_DIR/tuning``).
    tune_db: str | Path | None = None
    #: Run Python code shipped with a Hugging Face model folder (``auto_map``). Off by default:
    #: a model folder from a stranger must not run code on this machine.
    trust_remote_code: bool = False
    #: Third-party plugins (entry-point names) to load; None: all installed (or as
    #: ``$SLIMC_PLUGINS`` / ``$SLIMC_NO_PLUGINS`` say); ``()``: none.
    plugins: Sequence[str] | None = None
    #: Replace an existing artifact even if it holds files slimc did not write (they are
    #: deleted with it). Never replaces a directory slimc did not write.
    force: bool = False
    #: Put the TVM runtime for the target and a prebuilt C runner into ``OUT/runtime/``
    #: (:mod:`slimc.bundle`), so the board needs neither Python nor slimc.
    bundle: bool = False
    #: Reuse / fill the compile cache (:mod:`slimc.cache`); never used with ``tune``.
    cache: bool = True
    #: Write a Make-syntax depfile here listing every file the compile read.
    depfile: str | Path | None = None
    #: Causal LMs: build ``prefill`` + ``decode`` entry points over a KV cache instead of one
    #: fixed-length forward pass (see docs/generation.md).
    generate: bool = False
    #: KV cache length (prompt + generated tokens) for ``generate``.
    max_length: int | None = None
    #: Tokens per prefill call for ``generate`` (longer prompts are fed in chunks).
    prefill_length: int | None = None
    #: Task data scored on the original model and on the artifact (:mod:`slimc.task_eval`):
    #: a text file (perplexity), a TSV/CSV of scored pairs (Spearman), an image folder
    #: ``<label>/<image>`` (accuracy).
    eval_data: str | Path | None = None
    #: Task metric: ``perplexity``, ``spearman``, ``accuracy``, a plugin's task evaluator, or
    #: ``module:function`` (None: chosen from ``eval_data``).
    eval_kind: str | None = None
    #: Most batches of ``eval_data`` to score (each model runs them all).
    eval_batches: int = 16
    #: Fail (exit 2, no artifact) when the task metric gets worse by more than this share of
    #: the original value (0.02: 2%; for perplexity, a 2% rise).
    max_drop: float | None = None
    #: ``size=0.25,latency=0.5,params=0.5``: limits relative to the original model; the search
    #: (:mod:`slimc.search`) chooses the pipeline (docs/budget.md).
    budget: str | None = None
    #: Seconds the search may spend distilling its closest candidates when none meets
    #: ``max_drop`` (None: :data:`slimc.search.search.DISTILL_BUDGET_S`; 0: never).
    distill_budget: float | None = None


@dataclass
class CompileResult:
    output: Path
    manifest: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    #: Seconds per stage and per pass (also in ``timings.json``; not part of the identity).
    timings: dict[str, Any] = field(default_factory=dict)
    #: True when the artifact was copied from the compile cache.
    cached: bool = False
    #: Every file the compile read (what ``--depfile`` lists).
    reads: list[Path] = field(default_factory=list)


def compile_model(model: Any, options: CompileOptions | None = None, *,
                  stage: Stage = lambda name: None, log: Callable[[str], None] = lambda m: None,
                  registry=None, progress: Callable[[str], None] = lambda m: None,
                  ) -> CompileResult:
    """Compile ``model`` (HF directory, ``module:factory`` or ``.pt2`` path; or a loaded
    :class:`~slimc.loaders.base.LoadedModel`) into an artifact directory.

    An unchanged recompile is copied from the compile cache (``options.cache``); the bytes are
    those of a cold compile either way. ``progress`` receives status updates within a stage.
    """
    from slimc import cache as compile_cache
    from slimc.recipe import apply_recipe_settings

    options = apply_recipe_settings(options or CompileOptions())
    if isinstance(model, Path):
        model = str(model)
    elif not isinstance(model, str) and type(model).__name__ != "LoadedModel":
        model = _loaded(model, None, None)  # an ExportedProgram; nn.Module needs inputs
    declared = declared_files(model, options)
    ident = identity(model, options, declared)

    def build() -> CompileResult:
        from slimc.compiler import build_artifact

        return build_artifact(model, options, ident, stage=stage, log=log, registry=registry,
                              progress=progress)

    use_cache = (options.cache and not options.tune and isinstance(model, str)
                 and ":" not in (options.eval_kind or "")  # a user's metric can change
                 and registry is None and os.environ.get("SLIMC_CACHE", "1") != "0")
    cache = compile_cache.CompileCache() if use_cache else None
    if cache is None:
        with provenance.record_reads() as seen:
            result = build()
        result.reads = provenance.user_files(seen, exclude=[result.output])
    else:
        with cache.lock(ident["key"]):
            hit = cache.lookup(ident["key"])
            if hit is not None:
                stage("copy from the compile cache")
                result = _from_cache(hit, options, log)
            else:
                with provenance.record_reads() as seen:
                    result = build()
                reads = [f for f in provenance.user_files(seen, exclude=[result.output,
                                                                         cache.root])
                         if f not in set(declared)]
                cache.store(ident["key"], result.output, provenance.hash_files(reads),
                            result.warnings)
                result.reads = reads
    result.reads = sorted(set(declared) | set(result.reads))
    if options.depfile:
        # The target as the build system spells it (Make matches names, not inodes).
        target = Path(options.output) if options.output else Path(result.output.name)
        provenance.write_depfile(Path(options.depfile), target / artifact.LIBRARY, result.reads)
    return result


def compile(model: Any, example_inputs: Any = None, *, target: str | None = None,  # noqa: A001
            pipeline: str | None = None, recipe: str | Path | None = None,
            output: str | Path | None = None, name: str | None = None,
            **options: Any) -> CompileResult:
    """Compile ``model`` for ``target``; the Python form of ``slimc compile``.

    ``model`` is a path / ``module:factory`` string (as on the command line), a
    ``torch.nn.Module`` together with ``example_inputs`` (a tuple of tensors, or a dict of
    name -> tensor for keyword inputs), or a ``torch.export.ExportedProgram``. Other keyword
    arguments are :class:`CompileOptions` fields (``threads``, ``calib``, ``cache``, ...).
    In-memory models are not cached (their identity is not a set of files).
    """
    unknown = set(options) - set(CompileOptions.__dataclass_fields__)
    if unknown:
        raise UsageError(f"slimc.compile got unknown option(s) {', '.join(sorted(unknown))}.",
                         hint="Options are the fields of slimc.CompileOptions: "
                         f"{', '.join(CompileOptions.__dataclass_fields__)}.")
    opts = CompileOptions(target=target, pipeline=pipeline, recipe=recipe, output=output,
                          **options)
    if isinstance(model, (str, Path)):
        if example_inputs is not None:
            raise UsageError("example_inputs is for an nn.Module; a path's inputs come from "
                             "the model (override shapes with inputs=['NAME=SHAPE:DTYPE']).")
        return compile_model(str(model), opts)
    return compile_model(_loaded(model, example_inputs, name), opts)


def _loaded(model: Any, example_inputs: Any, name: str | None):
    """A LoadedModel for an in-memory nn.Module or ExportedProgram."""
    import inspect

    import torch

    from slimc.loaders.base import LoadedModel

    if isinstance(model, torch.export.ExportedProgram):
        if example_inputs is not None:
            raise UsageError("An ExportedProgram carries its own inputs; drop example_inputs.")
        return LoadedModel(name=name or "exported", program=model, source="<ExportedProgram>",
                           kind="python")
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"slimc.compile cannot compile a {type(model).__name__}.",
                         hint="Pass a model path, an nn.Module with example_inputs, or a "
                         "torch.export.ExportedProgram.")
    if example_inputs is None:
        raise UsageError("Compiling an nn.Module needs example inputs (a tuple of tensors or "
                         "a dict of name -> tensor) to capture the model.",
                         hint="Call slimc.compile(module, example_inputs, target=...).")
    model.eval()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        inputs, as_kwargs = dict(example_inputs), True
    else:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if len(params) < len(example_inputs):
            params += [f"input{i}" for i in range(len(params), len(example_inputs))]
        inputs, as_kwargs = dict(zip(params, example_inputs, strict=False)), False
    return LoadedModel(name=name or type(model).__name__, module=model, example_inputs=inputs,
                       as_kwargs=as_kwargs, source=f"<{type(model).__name__}>", kind="python")


def _from_cache(hit, options: CompileOptions, log: Callable[[str], None]) -> CompileResult:
    """Copy a cached artifact into the output directory (same bytes as the cold compile)."""
    manifest = json.loads((hit.artifact / artifact.MANIFEST).read_text())
    output = Path(options.output or f"{safe_name(manifest['model']['name'])}.slimc")
    from slimc.outdir import check_output_directory

    check_output_directory(output, force=options.force)
    with artifact.staged_directory(output, force=options.force) as stage_dir:
        # New modification times (shutil.copy, not copy2): to Make, the output is fresh.
        for item in hit.artifact.iterdir():
            if item.is_dir():
                shutil.copytree(item, stage_dir / item.name, copy_function=shutil.copy)
            else:
                shutil.copy(item, stage_dir / item.name)
    log(f"compile cache hit {manifest['provenance']['key'][:16]}")
    timings_file = hit.artifact / artifact.TIMINGS
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    return CompileResult(output.resolve(), manifest, list(hit.warnings), timings=timings,
                         cached=True,
                         reads=list(hit.reads))


def declared_files(model: Any, options: CompileOptions) -> list[Path]:
    """Files known before the compile to be inputs: model, recipe, calibration, tuning DB."""
    from slimc.cache import cache_root

    files = provenance.model_files(model) if isinstance(model, str) else []
    for extra in (options.recipe, options.calib, options.eval_data):
        if extra:
            files += provenance.files_under(Path(extra))
    # The tuning records a build applies (every target's; cheap JSON, no TVM needed here).
    files += provenance.files_under(Path(options.tune_db) if options.tune_db
                                    else cache_root() / "tuning")
    return sorted(set(files))


def identity(model: Any, options: CompileOptions, declared: list[Path]) -> dict[str, Any]:
    """Everything the artifact's bytes depend on, hashed; ``key`` addresses the cache."""
    root = Path(model).resolve() if isinstance(model, str) and Path(model).is_dir() else None

    def named(f: Path) -> str:  # model files by their path inside the model folder
        if root is not None and f.is_relative_to(root):
            return str(f.relative_to(root))
        return f.name

    from slimc.backends.tvm.runtime import set_threads

    ident: dict[str, Any] = {
        "model": model if isinstance(model, str) else model.source,
        "files": {named(f): provenance.sha256_file(f) for f in declared},
        "pipeline": options.pipeline, "opt_level": str(options.opt_level),
        "budget": options.budget,
        "target": options.target,
        "options": {"inputs": list(options.inputs), "threads": set_threads(options.threads),
                    "verify_tolerance": options.verify_tolerance, "emulate": options.emulate,
                    "emulate_timeout": options.emulate_timeout,
                    "save_ir": options.save_ir, "calib_batches": options.calib_batches,
                    "trust_remote_code": options.trust_remote_code, "bundle": options.bundle,
                    "plugins": None if options.plugins is None else sorted(options.plugins),
                    "generate": options.generate, "max_length": options.max_length,
                    "prefill_length": options.prefill_length,
                    "eval": options.eval_kind, "eval_batches": options.eval_batches,
                    "max_drop": options.max_drop,
                    "distill_budget": options.distill_budget,
                    # a text model's default sequence length (fixed or dynamic) is read here
                    "default_sequence": os.environ.get("SLIMC_DEFAULT_SEQUENCE") or None},
        "versions": {"slimc": _version("slimc"), "slimc_source": provenance.slimc_source_hash(),
                     "tvm": _version("apache-tvm"), "torch": _version("torch"),
                     "plugins": _plugin_versions()},
    }
    ident["key"] = provenance.digest_of(ident)
    return ident


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _plugin_versions() -> dict[str, str]:
    """Third-party plugin packages (entry-point group ``slimc``) and their versions."""
    out = {}
    for ep in metadata.entry_points(group="slimc"):
        dist = getattr(ep, "dist", None)
        out[ep.name] = f"{dist.name}=={dist.version}" if dist else ep.value
    return dict(sorted(out.items()))


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"
