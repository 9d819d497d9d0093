"""``slimc compile`` as a Python API: capture -> passes -> lower -> build -> verify -> write.

Every stage is checked before the next one starts: options are validated before the model is
loaded, each transform is verified by the pass manager, and the built library is run once and
compared with the IR before the output directory appears.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import slimc
from slimc import artifact
from slimc.api import CompileOptions, CompileResult, compile_model  # noqa: F401 (public here)
from slimc.backend import RunLimits
from slimc.capture import capture, load_model
from slimc.errors import LoweringError, UsageError, VerificationError
from slimc.evaluators import evaluate_all
from slimc.ir import IR
from slimc.loaders.base import LoadedModel, parse_overrides
from slimc.passmanager import AnalysisManager, PassContext, PassInvocation, PassManager
from slimc.pipeline import load_recipe, no_pass_message, parse_pipeline_text, recipe_items, validate
from slimc.plugins import Registry, get_registry
from slimc.quiet import native_stderr_to, silence_libraries
from slimc.report import render_report
from slimc.search.driver import FIXED_LEVELS, normalise_level, plan_search
from slimc.targets import TargetSpec, resolve_target

#: Fixed pipelines behind ``-O0``/``-O1``; ``-O2``, ``-O3``, ``-Os`` and ``--budget`` search
#: (:mod:`slimc.search`, docs/budget.md).
OPT_LEVELS: dict[int, str] = {int(k): v for k, v in FIXED_LEVELS.items()}


Stage = Callable[[str], None]


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (zig, the emulator): the stage
    timings' CPU column. Why: wall times on a shared host measure the load, not the compile
    (issue 18's measurements)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _clock() -> tuple[float, float]:
    """(wall, CPU) seconds now: the start of a stage for :func:`_stamp`."""
    return time.perf_counter(), _cpu_seconds()


def _stamp(timings: dict, stage: str, started: tuple[float, float]) -> None:
    """Record ``<stage>_s`` (wall) and ``<stage>_cpu_s`` since ``started`` (:func:`_clock`)."""
    timings[f"{stage}_s"] = time.perf_counter() - started[0]
    timings[f"{stage}_cpu_s"] = _cpu_seconds() - started[1]


def _resolve_pipeline(options: CompileOptions, registry: Registry) -> list[PassInvocation]:
    items: list[tuple[str, dict]] = []
    if options.recipe:
        recipe = load_recipe(options.recipe)
        items += recipe_items(recipe, origin=str(options.recipe))
    if options.pipeline is not None:
        if not options.pipeline.strip():  # a blank --pipeline is a mistake, not "the default"
            raise UsageError(no_pass_message(options.pipeline))
        items += parse_pipeline_text(options.pipeline)
    if not items:
        level = normalise_level(options.opt_level)
        # -O2/-O3/-Os and --budget: the search chooses; until then (and when nothing stays
        # within --max-drop) the lossless -O1 pipeline
        fixed = FIXED_LEVELS.get(level, FIXED_LEVELS["1"])
        items = parse_pipeline_text(fixed) if fixed else []  # -O0: no passes
    return validate(items, registry.passes)


def _with_overrides(model: LoadedModel, overrides: dict) -> LoadedModel:
    """An in-memory module's example inputs re-shaped by ``inputs=`` (ranges made dynamic),
    as the factory loader does for ``--input``; an ExportedProgram's inputs are fixed."""
    import dataclasses

    from slimc.loaders.base import apply_overrides, dynamic_dims

    if model.program is not None or model.module is None:
        raise UsageError("inputs= does not apply to an ExportedProgram: its input shapes were "
                         "fixed when it was exported.",
                         hint="Export it again with the shapes (torch.export dynamic_shapes), "
                         "or pass the nn.Module and example inputs instead.")
    inputs = apply_overrides(model.example_inputs, overrides,
                             accepted=list(model.example_inputs))
    return dataclasses.replace(model, example_inputs=inputs, dynamic=dynamic_dims(overrides))


def build_artifact(model: str | LoadedModel, options: CompileOptions, identity: dict[str, Any],
                   *, stage: Stage = lambda name: None,
                   log: Callable[[str], None] = lambda m: None, registry: Registry | None = None,
                   progress: Callable[[str], None] = lambda m: None) -> CompileResult:
    """The compile itself (no cache): validate, capture, passes, lower, build, verify, write.

    ``identity`` (from :func:`slimc.api.identity`) is recorded in the manifest as its
    provenance. Use :func:`slimc.compile` / :func:`compile_model`, which add the cache.
    ``progress`` receives status updates within a stage (tuning trials). SIGINT/SIGTERM stop
    the compile (:class:`slimc.interrupts.Interrupted`) and leave any old artifact untouched.
    """
    from slimc import interrupts

    def checked_stage(name: str) -> None:
        interrupts.check()  # a signal whose exception native code swallowed stops us here
        stage(name)

    from slimc.jobs import compile_jobs

    with interrupts.handle_signals(), compile_jobs(options.jobs) as jobs:
        log(f"compiling with {jobs} thread(s) (-j)")
        try:
            try:
                return _compile(model, options, identity, checked_stage, log, registry,
                                progress)
            except DynamicDefaultFailed as failed:
                # slimc chose the dynamic length, not the user: the example length is what
                # compiled before that default existed, so compile it (and say why)
                log(f"the default dynamic sequence failed ({failed.reason}); compiling the "
                    "fixed example length")
                return _compile(model, options, identity, checked_stage, log, registry,
                                progress, fixed_because=failed.reason)
        except Exception as exc:
            from slimc.outdir import disk_full_error

            where = Path(options.output).absolute().parent if options.output else Path.cwd()
            full = disk_full_error(exc, [where])
            if full is not None:
                raise full from exc
            raise


def _compile(model: str | LoadedModel, options: CompileOptions, identity: dict[str, Any],
             stage: Stage, log: Callable[[str], None], registry: Registry | None,
             progress: Callable[[str], None], fixed_because: str | None = None,
             ) -> CompileResult:
    """See :func:`build_artifact`. ``fixed_because``: why a text model's default dynamic
    sequence failed to lower or build (:class:`DynamicDefaultFailed`); this run compiles the
    fixed example length instead and records the reason in the manifest."""
    from slimc.outdir import check_output_directory
    from slimc.validate import check_batches, check_finite_weights, integer_input_ranges

    registry = registry or get_registry(options.plugins)
    timings: dict[str, float] = {}
    warnings: list[str] = []

    # Validate everything cheap before the expensive work.
    spec = resolve_target(options.target, registry)
    search_plan = plan_search(options)
    pipeline = _resolve_pipeline(options, registry)
    overrides = parse_overrides(list(options.inputs))
    backend = spec.get_backend(registry)
    backend.check(spec)
    tuning_plan = backend.plan_tuning(spec, options.tune, options.tune_minutes, options.tune_db)
    threads = backend.set_threads(options.threads)
    if options.output is not None:  # before the model is loaded: fail in a second, not an hour
        check_output_directory(Path(options.output), force=options.force)
    if options.emulate_timeout is not None and not options.emulate_timeout > 0:
        raise UsageError(f"--emulate-timeout {options.emulate_timeout:g} is not a positive "
                         "number of seconds.", hint="Pass e.g. --emulate-timeout 900, or leave "
                         "it out to derive the limit from the model's size.")

    silence_libraries()
    native_log: list[str] = []

    stage("capture")
    started = _clock()
    if isinstance(model, LoadedModel):
        if overrides:  # slimc.compile(module, example, inputs=[...]): not silently dropped
            model = _with_overrides(model, overrides)
        loaded = model if fixed_because is None else _without_default_dynamic(model)
    else:
        loaded = load_model(
            model, overrides, registry, trust_remote_code=options.trust_remote_code,
            default_sequence="fixed" if fixed_because else _default_sequence(backend, options))
    generation = None
    if options.generate:
        from slimc.generation.prepare import prepare_generation

        if not getattr(backend, "supports_generation", False):
            raise UsageError(f"--generate is not available for {spec.name} (a {spec.backend} "
                             "target): its backend has no prefill/decode runtime.",
                             hint="Use --target llvm, arm or a CUDA target (cuda, h100, ...).")
        loaded, generation = prepare_generation(loaded, options.max_length,
                                                options.prefill_length)
    ir, example_inputs = capture(loaded)
    # --calib with --generate drives the wrapper's step; otherwise nothing needs the module
    generation_step = loaded.module.step if generation is not None else None
    if loaded is not model:  # ours: the IR holds what is needed, the module's weights can go
        del loaded
    _stamp(timings, "capture", started)
    if fixed_because is not None:
        ir.annotations.setdefault("source", {})["default_sequence"] = (
            f"fixed (a dynamic length failed: {fixed_because})")
    # slimc's own default, not the user's request: a failure below falls back to fixed
    default_dynamic = ir.is_dynamic and \
        ir.annotations.get("source", {}).get("default_sequence") == "dynamic"
    sequence = str(ir.annotations.get("source", {}).get("default_sequence") or "")
    if sequence.startswith("fixed ("):  # the default dynamic length could not be captured
        warnings.append(f"the sequence length is {sequence}; pass --input "
                        "input_ids=1xN:int64 to choose it.")
    converted = ir.annotations.get("source", {}).get("converted_dtype")
    if converted:  # see capture._compute_in_float32
        warnings.append(f"the model's {converted} (call model.float() to silence this).")
    output = Path(options.output or f"{_safe_name(ir.name)}.slimc")
    check_output_directory(output, force=options.force)
    check_finite_weights(ir)
    input_ranges = integer_input_ranges(ir)
    # What the built library is checked on: the example, or under an emulator a short input
    # when the sizes are dynamic (emulation costs ~100x native; see _emulated_check_inputs).
    check_inputs = _emulated_check_inputs(ir, example_inputs, spec, options)
    ctx = PassContext(target=spec, example_inputs=example_inputs, threads=threads, log=log)
    original_outputs = [o.numpy() for o in _outputs(ir, ctx, check_inputs)]
    calibration = None
    if options.calib:
        from slimc.calibration import load_calibration, spread_for
        from slimc.generation.prepare import generation_calibration

        load = generation_calibration if generation is not None else load_calibration
        calibration = load(
            options.calib, dict(zip(ir.input_names, example_inputs, strict=True)),
            model_dir=ir.annotations.get("source", {}).get("tokenizer"),
            max_batches=options.calib_batches,
            **({"step": generation_step} if generation is not None
               else {"spread": spread_for(options.calib, options.eval_data)}))
        warnings += calibration.warnings
        check_batches(calibration.batches, input_ranges, f"--calib {options.calib}")
        ctx.calibration_batches = [[batch[name] for name in ir.input_names]
                                   for batch in calibration.batches]
    if generation is None:
        ctx.load_data = _data_loader(ir, example_inputs, input_ranges)
    generation_step = None  # holds the captured module's weights: let them go
    task = _prepare_task(options, ir, example_inputs, registry, calibration, warnings, stage,
                         searching=search_plan is not None)
    manager = PassManager(registry.passes,
                          plugin_of=lambda name: registry.provided_by("pass", name))
    ctx.analyses = AnalysisManager(ir, ctx, manager.lookup)
    before = ctx.analyses.get("model-stats")

    started = _clock()
    search_entry, chosen = None, None
    if search_plan is not None:
        from slimc.search.driver import run_search

        stage("search for a compression within " + search_plan.describe())
        chosen, search_entry = run_search(search_plan, ir, ctx, registry, spec, task, log,
                                          warnings)
        _stamp(timings, "search", started)
    if chosen is not None:
        ir, records = chosen.ir, chosen.records
        ctx.analyses = chosen.ctx.analyses
        pipeline = validate(chosen.items, registry.passes)
    else:
        records = manager.run(ir, pipeline, ctx, on_pass=lambda inv: stage(f"pass {inv.name}"))
    _stamp(timings, "passes", started)
    after = ctx.analyses.get("model-stats")
    ir_outputs = [o.numpy() for o in _outputs(ir, ctx, check_inputs)]

    stage("lower")
    started = _clock()
    with _dynamic_build(ir, default_dynamic, "the TVM import"), native_stderr_to(native_log):
        mod = backend.lower(ir, spec, registry.converters)
    entries = None
    if generation is not None:
        from slimc.generation.prepare import entry_plan
        from slimc.generation.split import split_entry_points

        plan = entry_plan(generation, ir.input_names)
        mod = split_entry_points(mod, plan)
        entries = [(name, inputs) for name, (inputs, _) in plan.items()]
    _stamp(timings, "lower", started)
    if not _runs_ir_after_build(ir, options, task):
        from slimc.memory import return_freed_memory

        ir.release_weights()  # the module holds what the build needs
        return_freed_memory()

    limits = _run_limits(ctx, options, progress)
    # A big cross artifact is checked kernel by kernel (kernel_check.py): the build keeps
    # its scheduled module for the host rebuild.
    per_kernel = _kernel_check_reason(backend, spec, options, limits, entries)
    keep: dict | None = {} if per_kernel else None
    guest = _start_kernel_guest(backend, spec, threads) if per_kernel else None
    # the guest first: a staging failure then still stops it (it waits on stdin otherwise)
    with (guest if guest is not None else contextlib.nullcontext()), \
            artifact.staged_directory(output, force=options.force) as stage_dir:
        tuner = backend.open_tuner(tuning_plan, spec, progress)
        stage(f"tune and build for {spec.name}" if options.tune else f"build for {spec.name}")
        started = _clock()
        with _dynamic_build(ir, default_dynamic, "the TVM build"), \
                native_stderr_to(native_log):
            library = backend.build(mod, spec, stage_dir / artifact.LIBRARY, tuning=tuner,
                                    **({"keep": keep} if keep is not None else {}))
        _stamp(timings, "build", started)

        stage("verify")
        started = _clock()
        from slimc.dialect import rounding_noise_floor

        # A dynamic artifact runs at several sizes: load it once for all of them.
        runner = _open_runner(backend, library, spec, threads) if ir.is_dynamic else None
        noise_floor = lambda: rounding_noise_floor(ir, check_inputs, ir_outputs)  # noqa: E731
        verification = None
        if keep is not None and keep.get("scheduled") is not None:
            verification, artifact_outputs = _verify_per_kernel(
                library, spec, backend, keep, [x.numpy() for x in check_inputs], ir_outputs,
                options, threads, warnings, noise_floor, limits, per_kernel, guest)
        keep = None
        if verification is None:
            verification, artifact_outputs = _verify_artifact(
                library, spec, [x.numpy() for x in check_inputs], ir_outputs, options,
                threads, warnings, noise_floor=noise_floor, backend=backend, limits=limits,
                entries=entries, module=mod, runner=runner)
            if spec.is_cross and verification.get("passed"):
                verification["method"] = "whole-model"
        if artifact_outputs is not None and ir.is_dynamic:
            verification["sizes"] = _symbol_sizes(ir, check_inputs)
            verification.update(_verify_other_shapes(
                ir, library, spec, check_inputs, options, threads, warnings,
                verification["tolerance"], runner))
        del runner
        _stamp(timings, "verify", started)

        quality = None
        if task is not None:
            stage("evaluate the task metric on the artifact")
            started = _clock()
            quality = _measure_artifact(task, library, spec, ir, threads, options, warnings,
                                        search_plan.max_drop if search_plan else None)
            _stamp(timings, "evaluate", started)

        reference = artifact_outputs if artifact_outputs is not None else ir_outputs
        if [o.shape for o in original_outputs] == [o.shape for o in reference]:
            fidelity = evaluate_all(registry.evaluators, original_outputs, reference,
                                    ir.output_names)
            fidelity["measured_on"] = "artifact" if artifact_outputs is not None else "ir"
            if verification.get("method") == "per-kernel":  # the artifact's kernels, on x86
                fidelity["measured_on"] = "host build of the artifact's kernels"
            fidelity["compared"] = ("original model (fp32, before any pass) vs the "
                                    + ("built library" if artifact_outputs is not None
                                       else "compressed IR") + " on one example input")
        else:  # e.g. prune{outputs=prune} narrowed an embedding on purpose
            fidelity = {"comparable": False, "reason": "output shapes changed from "
                        f"{[list(o.shape) for o in original_outputs]} to "
                        f"{[list(o.shape) for o in reference]}; compare on a downstream task"}
            warnings.append(f"fidelity not measured: {fidelity['reason']}.")

        stage("write")
        write_start = time.perf_counter()  # write_s: inputs, IR, bundle, manifest, report
        np.savez(stage_dir / artifact.EXAMPLE_INPUTS,
                 **{n: x.numpy() for n, x in zip(ir.input_names, example_inputs, strict=True)})
        if options.save_ir:
            ir.save(stage_dir / "ir.pt2")
        tokenizer_dir = _copy_tokenizer(ir, stage_dir)
        if options.bundle:
            from slimc.bundle import write_bundle

            stage("bundle the TVM runtime and C runner")
            write_bundle(stage_dir, spec.triple if spec.is_cross else None)
        manifest = _manifest(ir, spec, pipeline, records, before, after, fidelity,
                             verification, library, threads, timings,
                             model if isinstance(model, str) else model.source,
                             isa=backend.required_isa(spec))
        manifest["tokenizer"] = tokenizer_dir
        for entry in manifest["inputs"]:
            if entry["name"] in input_ranges:
                entry["min"], entry["max"] = input_ranges[entry["name"]]
        manifest["generation"] = generation
        manifest["tuning"] = tuner.report if tuner else None
        manifest["calibration"] = calibration.to_json() if calibration else None
        manifest["provenance"] = identity
        manifest["quality"] = quality
        manifest["search"] = search_entry
        if chosen is not None:
            from slimc.search.driver import write_recipe

            write_recipe(stage_dir / "recipe.yaml", chosen, spec.name, options.inputs,
                         f"chosen by slimc's search for {search_entry['request']}")
            search_entry["recipe"] = "recipe.yaml"
        (stage_dir / artifact.REPORT).write_text(render_report(manifest))
        manifest, all_timings = artifact.split_timings(manifest)
        artifact.write_json(stage_dir / artifact.MANIFEST, manifest)
        all_timings["stages"]["write_s"] = time.perf_counter() - write_start
        artifact.write_json(stage_dir / artifact.TIMINGS, all_timings)
    return CompileResult(output.resolve(), manifest, warnings, timings=all_timings)


class DynamicDefaultFailed(Exception):
    """The TVM import or build of a program with slimc's *default* dynamic sequence length
    failed; :func:`build_artifact` compiles the fixed example length instead. Not a
    :class:`~slimc.errors.SlimcError`: it never reaches the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@contextlib.contextmanager
def _dynamic_build(ir: IR, default_dynamic: bool, where: str):
    """Translate a failure to import or build a dynamic program.

    With slimc's default dynamic length (``default_dynamic``) it becomes
    :class:`DynamicDefaultFailed` (the compile retries at the fixed length, as capture does
    when the dynamic export fails). With dynamic dimensions the user asked for, an internal
    failure (exit 1, a traceback) becomes one paragraph with exit 2 that names the way out:
    fixed shapes. Static programs, slimc's own errors, interrupts and a full disk pass
    unchanged.
    """
    from slimc.errors import PluginError, SlimcError
    from slimc.outdir import disk_full_error

    try:
        yield
    except Exception as exc:
        if not ir.is_dynamic or disk_full_error(exc, [Path.cwd()]) is not None \
                or isinstance(exc, (MemoryError, VerificationError)):
            raise
        text = exc.message if isinstance(exc, SlimcError) else f"{type(exc).__name__}: {exc}"
        detail = " ".join(text.split())[:300].rstrip(".")
        if default_dynamic:
            raise DynamicDefaultFailed(f"{where}: {detail}") from exc
        if isinstance(exc, (UsageError, PluginError)) and not isinstance(exc, LoweringError):
            raise  # already the user's paragraph, and not about the dynamic dimensions
        dims = ", ".join(sorted(str(v) for v in ir.annotations.get("symbols", {}).values())) \
            if isinstance(ir.annotations.get("symbols"), dict) else ""
        raise UsageError(
            f"{where[0].upper()}{where[1:]} of {ir.name!r} failed with the dynamic dimensions "
            f"asked for{f' ({dims})' if dims else ''}: {detail}. Some operations lower only "
            "at fixed sizes.", hint="Give the inputs fixed shapes (e.g. --input "
            "input_ids=1x128:int64); if that fails too, "
            f"{_lowercase_first(exc.hint) if getattr(exc, 'hint', None) else 'please report it.'}"
            ) from exc


def _lowercase_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _without_default_dynamic(loaded: LoadedModel) -> LoadedModel:
    """A copy of ``loaded`` with its default dynamic dimensions dropped (the caller's object
    is left as it is)."""
    import dataclasses

    return dataclasses.replace(loaded, dynamic={}, extra=dict(loaded.extra))


def _default_sequence(backend, options: CompileOptions) -> str | None:
    """The sequence length a text model gets when ``--input`` does not shape it (None: the
    loader's default). ``--generate`` sizes its own prefill/decode inputs, so the forward's
    length is unused; backends that do not declare ``dynamic_sequence_default`` (the GPU
    backends: their dlight schedules were not checked on symbolic lengths) stay fixed unless
    ``SLIMC_DEFAULT_SEQUENCE=dynamic`` asks."""
    import os

    from slimc.loaders.huggingface import SEQUENCE_ENV

    if options.generate:
        return "fixed"
    if not getattr(backend, "dynamic_sequence_default", False) and \
            os.environ.get(SEQUENCE_ENV, "").strip().lower() != "dynamic":
        return "fixed"
    return None


def _runs_ir_after_build(ir: IR, options: CompileOptions, task) -> bool:
    """Whether anything after the build needs the IR's weights: checks at other dynamic sizes,
    the task metric (cross targets score the IR), ``--save-ir``, the rounding-noise floor of
    static int8 activations."""
    from slimc.dialect import OPS

    return (ir.is_dynamic or task is not None or bool(options.save_ir)
            or any(node.target is OPS["linear_w8a8"] for node in ir.nodes("call_function")))


def _prepare_task(options: CompileOptions, ir: IR, example_inputs, registry: Registry,
                  calibration, warnings: list[str], stage: Stage, searching: bool = False):
    """``--eval-data``/``--eval``: prepare the task metric and score the original model (the
    captured fp32 graph, before any pass changes it); None when no evaluation was asked for
    (a search then bounds a proxy, see :func:`slimc.search.search.proxy_scorer`)."""
    if options.eval_data is None and not options.eval_kind:
        if options.max_drop is not None and not searching:
            raise UsageError("--max-drop needs a task metric to measure the drop on.",
                             hint="Add --eval-data PATH (and --eval KIND if it is ambiguous).")
        return None
    from slimc import task_eval

    if options.generate:
        raise UsageError("--eval-data is not supported with --generate yet.",
                         hint="Compile the forward pass (without --generate) to measure it.")
    if options.max_drop is not None and not options.max_drop >= 0:
        raise UsageError(f"--max-drop {options.max_drop:g} is negative.",
                         hint="Give the largest allowed loss as a share of the original value, "
                         "e.g. --max-drop 0.02 for 2%.")
    if options.eval_batches < 1:
        raise UsageError("--eval-batches must be at least 1.")
    from slimc.calibration import spread_for

    skip, held_out = 0, "separate from the calibration data"
    if options.calib is None:
        held_out = "no calibration data was used"
    elif options.eval_data is not None and not spread_for(options.calib, options.eval_data):
        skip = len(calibration.batches)
        held_out = (f"same file as --calib: the first {skip} batch(es) went to calibration and "
                    "evaluation uses what follows")
        warnings.append(f"--eval-data is the --calib file: {held_out}.")
    ctx = task_eval.EvalContext(
        input_names=list(ir.input_names),
        template={n: x.numpy() for n, x in zip(ir.input_names, example_inputs, strict=True)},
        model_dir=ir.annotations.get("source", {}).get("tokenizer"),
        max_batches=options.eval_batches, skip=skip)
    task = task_eval.prepare(options.eval_kind, options.eval_data, ctx, registry.evaluators,
                             held_out)
    stage("evaluate the task metric on the original model")
    task.measure("original", lambda arrays: [
        o.numpy()
        for o in ir.run([torch.from_numpy(np.require(a, requirements="C")) for a in arrays])])
    return task


def _measure_artifact(task, library: Path, spec: TargetSpec, ir: IR, threads: int,
                      options: CompileOptions, warnings: list[str],
                      level_max_drop: float | None = None) -> dict[str, Any]:
    """Score the built library on this host (the compressed IR where it cannot run here), then
    warn or fail (``--max-drop``) on the drop."""
    from slimc.backend import DeviceUnavailable
    from slimc.task_eval import DEFAULT_WARN_DROP, describe

    backend = spec.get_backend()
    run, compared = None, None
    if not spec.is_cross:
        try:
            run = backend.load(library, {"target": {"cross_triple": None},
                                         "isa": backend.required_isa(spec)}, threads)
            compared = f"the built library run on {backend.where(spec)}"
        except DeviceUnavailable as exc:
            compared = f"the compressed IR (the library cannot run here: {exc})"
    else:
        compared = (f"the compressed IR (the {spec.triple} library does not run on this host; "
                    "it was checked against the IR on the example input)")
    if run is None:
        run = lambda arrays: [o.numpy() for o in ir.run(  # noqa: E731
            [torch.from_numpy(np.require(a, requirements="C")) for a in arrays])]
    task.measure("artifact", run)
    quality = task.to_json(compared)
    line = describe(quality)
    max_drop = options.max_drop if options.max_drop is not None else level_max_drop
    if max_drop is not None and quality["drop"] > max_drop:
        raise UsageError(
            f"The task metric got worse by {quality['drop']:.1%}, more than --max-drop "
            f"{max_drop:g} allows: {line}. No artifact was written.",
            hint="Compress less (a milder pipeline or fewer layers), give calibration data, "
            "or raise --max-drop.")
    if quality["drop"] > DEFAULT_WARN_DROP:
        warnings.append(f"task quality dropped by {quality['drop']:.1%} "
                        f"(more than {DEFAULT_WARN_DROP:.0%}): {line}.")
    return quality


def _data_loader(ir: IR, example_inputs: list[torch.Tensor],
                 input_ranges: dict) -> Callable[[str, int], list[list[torch.Tensor]]]:
    """``ctx.load_data``: a pass's own data file (``distill{data=...}``) read like ``--calib``
    (the model's tokenizer, batches shaped like the example inputs, a long text sampled at
    even strides), checked like it."""
    from slimc.calibration import load_calibration
    from slimc.validate import check_batches

    template = dict(zip(ir.input_names, example_inputs, strict=True))
    tokenizer = ir.annotations.get("source", {}).get("tokenizer")

    def load(path: str, max_batches: int) -> list[list[torch.Tensor]]:
        data = load_calibration(path, template, model_dir=tokenizer, max_batches=max_batches)
        check_batches(data.batches, input_ranges, f"data {path}")
        return [[batch[name] for name in ir.input_names] for batch in data.batches]

    return load


def _outputs(ir: IR, ctx: PassContext, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``ir.run(inputs)``, shared with the pass manager's checks when ``inputs`` are the
    example inputs they run on (:meth:`PassContext.outputs_on_examples`)."""
    if inputs is ctx.example_inputs:
        return ctx.outputs_on_examples(ir)
    return ir.run(inputs)


#: An artifact with static int8 activations passes if it is within this many times the IR's
#: rounding-noise floor (the IR against itself with float noise at its quantizers).
ROUNDING_FLOOR_MARGIN = 3.0


def _verify_artifact(library: Path, spec: TargetSpec, inputs: list[np.ndarray],
                     ir_outputs: list[np.ndarray], options: CompileOptions, threads: int,
                     warnings: list[str], noise_floor: Callable[[], float | None] | None = None,
                     limits: RunLimits | None = None, entries=None, backend=None,
                     module: Any = None, runner: Callable | None = None,
                     ) -> tuple[dict[str, Any], list[np.ndarray] | None]:
    from slimc.backend import DeviceUnavailable, RunFailed
    from slimc.precision import tolerance as precision_tolerance

    backend = backend or spec.get_backend()
    cross = spec.triple if spec.is_cross else None
    what = cross or spec.name
    precision = backend.target_info(spec).precision
    tolerance = max(options.verify_tolerance, precision_tolerance(precision))
    if cross and options.emulate == "skip":
        warnings.append(f"the {cross} artifact was not run (--emulate skip).")
        return {"ran_on": None, "passed": None, "reason": "skipped by request"}, None
    try:
        if runner is not None and not entries:  # loaded once (dynamic: several sizes)
            outputs = runner(inputs)
        else:
            outputs = backend.run(library, spec, inputs, threads, limits=limits,
                                  **({"entries": entries} if entries else {}))
    except DeviceUnavailable as exc:
        if options.emulate == "require":
            raise UsageError(f"Cannot run the {what} artifact to verify it: {exc}.",
                             hint="Or pass --emulate skip to accept an unverified artifact.") \
                from None
        warnings.append(f"the {what} artifact was built but not run: {exc}.")
        verification = {"ran_on": None, "passed": None, "reason": str(exc),
                        "precision": precision}
        host_check = getattr(backend, "host_numerics", None)
        if precision != "fp32" and host_check is not None and module is not None \
                and options.emulate != "skip":
            verification["host_numerics"] = _check_host_numerics(
                host_check, module, spec, inputs, ir_outputs, entries, threads, tolerance,
                precision)
        return verification, None
    except RunFailed as exc:
        return _run_failed(exc, what, options, warnings), None
    from slimc.evaluators import max_abs_error, relative_l2

    _check_output_shapes(outputs, ir_outputs)
    err = relative_l2(ir_outputs, outputs)
    where = backend.where(spec)
    tolerance, floor = _with_noise_floor(tolerance, noise_floor, warnings)
    if not err <= tolerance:
        detail = (f" (the IR's own rounding-noise floor is {floor:.3g})" if floor else "")
        raise VerificationError(
            f"The built library disagrees with the IR it was built from: relative L2 error "
            f"{err:.3g} > tolerance {tolerance:g}{detail} (run on {where}). No artifact "
            "was written.", hint="This is a slimc/TVM bug; please report it with the model "
            "(--save-ir keeps the IR). --verify-tol raises the tolerance if you accept it.")
    return {"ran_on": where, "passed": True, "relative_l2_vs_ir": err,
            "max_abs_error_vs_ir": max_abs_error(ir_outputs, outputs),
            "tolerance": tolerance, "rounding_noise_floor": floor, "precision": precision,
            **({"run_budget": limits.budget} if limits and limits.budget else {})}, outputs


def _kernel_check_reason(backend, spec: TargetSpec, options: CompileOptions,
                         limits: RunLimits, entries) -> str | None:
    """Why this compile verifies its cross artifact kernel by kernel, or None (the whole model
    runs under the emulator: small models, native targets, ``--emulate skip``, generation
    artifacts)."""
    wants = getattr(backend, "wants_kernel_check", None)
    if wants is None or entries or options.emulate == "skip" or not spec.is_cross:
        return None
    return wants(spec, limits)


def _start_kernel_guest(backend, spec: TargetSpec, threads: int):
    """The per-kernel check's emulator, started before the build so that its start-up under
    the emulator (interpreter, imports, TVM runtime: ~2 s of one core idle, 5-7 s loaded)
    overlaps the single-threaded build; None when the backend has none or it cannot start
    (the check then starts it and reports why)."""
    start = getattr(backend, "start_kernel_guest", None)
    return start(spec, threads) if start is not None else None


def _verify_per_kernel(library: Path, spec: TargetSpec, backend, keep: dict,
                       inputs: list[np.ndarray], ir_outputs: list[np.ndarray],
                       options: CompileOptions, threads: int, warnings: list[str],
                       noise_floor: Callable[[], float | None], limits: RunLimits,
                       reason: str, guest: Any = None,
                       ) -> tuple[dict[str, Any] | None, list[np.ndarray] | None]:
    """Verify a big cross artifact in two halves (:mod:`slimc.backends.tvm.kernel_check`):
    the module it was built from, rebuilt for this CPU, runs the whole model against the IR;
    the emulator calls each distinct kernel of the written library once on the arguments the
    host run gave it. Returns ``(None, None)`` when the module cannot be rebuilt for the host
    (the caller runs the whole model under the emulator). ``guest``: the emulator started
    before the build (:func:`_start_kernel_guest`); closed here."""
    try:
        return _check_kernels(library, spec, backend, keep, inputs, ir_outputs, options,
                              threads, warnings, noise_floor, limits, reason, guest)
    finally:
        if guest is not None:  # done, or not needed (the whole model runs instead)
            guest.close()


def _check_kernels(library: Path, spec: TargetSpec, backend, keep: dict,
                   inputs: list[np.ndarray], ir_outputs: list[np.ndarray],
                   options: CompileOptions, threads: int, warnings: list[str],
                   noise_floor: Callable[[], float | None], limits: RunLimits, reason: str,
                   guest: Any) -> tuple[dict[str, Any] | None, list[np.ndarray] | None]:
    """:func:`_verify_per_kernel`'s two halves; ``guest``: the emulator already started for
    the second (None: ``backend.run`` starts it)."""
    import tempfile

    from slimc.backend import DeviceUnavailable, RunFailed
    from slimc.backends.tvm.kernel_check import KernelCheckUnavailable, compare, write_plan
    from slimc.evaluators import max_abs_error, relative_l2
    from slimc.memory import return_freed_memory
    from slimc.precision import tolerance as precision_tolerance

    precision = backend.target_info(spec).precision
    tolerance = max(options.verify_tolerance, precision_tolerance(precision))
    limits.progress("verify: the artifact's kernels built for this CPU run the whole model")
    try:
        record = backend.record_kernels(keep, inputs, threads)
    except KernelCheckUnavailable as exc:
        keep.clear()
        return_freed_memory()
        import logging

        logging.getLogger(__name__).info("per-kernel check unavailable (%s): running the "
                                         "whole model", exc)
        return None, None
    host_outputs = record.outputs
    _check_output_shapes(host_outputs, ir_outputs)
    err = relative_l2(ir_outputs, host_outputs)
    tolerance, floor = _with_noise_floor(tolerance, noise_floor, warnings)
    if not err <= tolerance:
        raise VerificationError(
            f"The artifact's kernels (built for this CPU from the module the {spec.triple} "
            f"library was built from) disagree with the IR: relative L2 error {err:.3g} > "
            f"tolerance {tolerance:g}. No artifact was written.",
            hint="This is a slimc/TVM bug; please report it with the model (--save-ir keeps "
            "the IR). --verify-tol raises the tolerance if you accept it.")
    where = backend.where(spec)
    with tempfile.TemporaryDirectory(prefix="slimc-kernels-") as tmp:
        arrays = str(Path(tmp) / "kernel_args.npz")
        plan = write_plan(record, arrays)
        for case in record.cases:  # written out: only the expected outputs stay
            case.args = []
        keep.clear()  # the host module and the weights it bound: before the emulator starts
        return_freed_memory()
        limits.progress(f"verify: {len(record.cases)} kernels under {where}")
        emulation_started = time.perf_counter()
        guest_timings: dict[str, Any] = {}
        try:
            emulated = backend.run(library, spec, [], threads, limits=limits,
                                   kernels=(arrays, plan), timings=guest_timings,
                                   **({"guest": guest} if guest is not None else {}))
        except DeviceUnavailable as exc:
            if options.emulate == "require":
                raise UsageError(f"Cannot run the {spec.triple} artifact to verify it: {exc}.",
                                 hint="Or pass --emulate skip to accept an unverified "
                                 "artifact.") from None
            warnings.append(f"the {spec.triple} artifact was built but not run: {exc}.")
            return {"ran_on": None, "passed": None, "reason": str(exc),
                    "precision": precision}, None
        except RunFailed as exc:
            return _run_failed(exc, spec.triple, options, warnings), None
    emulated_s = time.perf_counter() - emulation_started
    worst, worst_name, failed = compare(record, emulated, tolerance)
    if failed:
        raise VerificationError(
            f"{len(failed)} of the {len(record.cases)} kernels of the {spec.triple} library "
            f"disagree, run on {where}, with the same kernels built for this CPU: "
            f"{', '.join(failed[:3])} > tolerance {tolerance:g}. No artifact was written.",
            hint="This is a slimc/TVM bug (the aarch64 code generation); please report it "
            "with the model. SLIMC_KERNEL_CHECK_ABOVE_S=inf runs the whole model instead.")
    return {"ran_on": where, "passed": True, "method": "per-kernel", "method_reason": reason,
            "relative_l2_vs_ir": err, "max_abs_error_vs_ir": max_abs_error(ir_outputs,
                                                                           host_outputs),
            "relative_l2_vs_ir_on": "the artifact's kernels built for this CPU (whole model)",
            "kernels": {"checked": len(record.cases), "total": record.kernels_total,
                        "calls_in_model": record.kernel_calls,
                        "not_checked": record.unchecked,
                        "weights_from_library": record.weights_from_library,
                        "worst": worst_name, "worst_relative_l2": worst},
            "not_covered": "the aarch64 run of the VM bytecode end to end, and each kernel's "
            "calls after its first",
            "seconds": {"host_build": round(record.build_s, 2),
                        "host_run": round(record.run_s, 2), "emulator": round(emulated_s, 2),
                        **({"emulator_parts": guest_timings} if guest_timings else {})},
            "tolerance": tolerance, "rounding_noise_floor": floor, "precision": precision,
            **({"run_budget": limits.budget} if limits.budget else {})}, host_outputs


def _check_output_shapes(outputs: list[np.ndarray], ir_outputs: list[np.ndarray]) -> None:
    """The library returns what the IR returns (count and shapes), or a slimc/TVM bug."""
    if len(outputs) != len(ir_outputs) or any(
            o.shape != r.shape for o, r in zip(outputs, ir_outputs, strict=False)):
        raise VerificationError(
            f"The built library returns {[o.shape for o in outputs]} where the IR returns "
            f"{[r.shape for r in ir_outputs]}.", hint="This is a slimc/TVM bug; please report it.")


def _with_noise_floor(tolerance: float, noise_floor: Callable[[], float | None] | None,
                      warnings: list[str]) -> tuple[float, float | None]:
    """``(tolerance, floor)``: the tolerance raised to :data:`ROUNDING_FLOOR_MARGIN` x the IR's
    rounding-noise floor (static int8 activations: float noise alone flips codes, see
    ``rounding_noise_floor``). A non-finite floor (the IR's own perturbed runs overflowed) is
    dropped with a warning rather than an infinite tolerance that would pass any library."""
    floor = noise_floor() if noise_floor is not None else None
    if floor is not None and not math.isfinite(floor):
        warnings.append(f"the IR's rounding-noise floor is {floor} (its perturbed runs "
                        "overflow); the artifact was checked at the plain tolerance")
        floor = None
    if floor is not None:
        tolerance = max(tolerance, ROUNDING_FLOOR_MARGIN * floor)
    return tolerance, floor


def _check_host_numerics(host_check, module, spec: TargetSpec, inputs, ir_outputs, entries,
                         threads: int, tolerance: float, precision: str) -> dict[str, Any]:
    """The device is absent: run the same half-precision module built for this CPU and hold
    it to the precision's tolerance against the fp32 IR (a model that overflows fp16 fails
    here, at build time, instead of on the device)."""
    from slimc.evaluators import max_abs_error, relative_l2

    outputs = host_check(module, spec, inputs, entries, threads)
    err = relative_l2(ir_outputs, outputs)
    finite = all(np.isfinite(o).all() for o in outputs)
    if not (finite and err <= tolerance):
        problem = "non-finite outputs (an fp16 overflow)" if not finite else (
            f"relative L2 error {err:.3g} > tolerance {tolerance:g}")
        raise UsageError(
            f"The {spec.name} artifact computes in {precision}, and that arithmetic (the same "
            f"module built for this CPU) gives {problem} against the fp32 model. No artifact "
            "was written.",
            hint=f"Use {spec.name.split(':')[0]}:precision=bf16 (fp32's range) or "
            f"{spec.name.split(':')[0]}:precision=fp32, or --verify-tol to accept the error.")
    return {"ran_on": "host CPU (the same mixed-precision module built for llvm)",
            "passed": True, "relative_l2_vs_ir": err,
            "max_abs_error_vs_ir": max_abs_error(ir_outputs, outputs), "tolerance": tolerance}


def _run_limits(ctx: PassContext, options: CompileOptions,
                progress: Callable[[str], None]) -> RunLimits:
    """What the verification run computes and loads (sizes an emulator's time budget)."""
    flops = weight_bytes = 0.0
    try:
        total = ctx.analyses.get("cost").total
        flops, weight_bytes = float(total.get("flops", 0)), float(total.get("weight_bytes", 0))
    except Exception:  # noqa: BLE001 - an estimate failing must not fail the compile
        pass
    return RunLimits(flops=flops, weight_bytes=weight_bytes, timeout_s=options.emulate_timeout,
                     progress=progress)


def _run_failed(exc, what: str, options: CompileOptions, warnings: list[str]) -> dict[str, Any]:
    """A verification run that crashed or ran out of time: an unverified artifact under
    ``--emulate auto``, exit 2 with what to do under ``require``; never an internal error."""
    summary, _, tail = str(exc).partition("\n")
    if options.emulate == "require":
        tail = "\n".join(tail.strip().splitlines()[-5:])
        raise UsageError(
            f"Could not verify the {what} artifact: {summary}. No artifact was written."
            + (f"\nEmulator output (tail):\n{tail}" if tail else ""),
            hint="Verify on a shorter input (e.g. --input input_ids=1x8:int64), give the "
            "emulator more time with --emulate-timeout SECONDS (or SLIMC_EMULATE_TIMEOUT), "
            "or build with --emulate auto/skip and check the artifact on the device itself "
            "(`slimc run DIR` there).") from None
    warnings.append(f"the {what} artifact is NOT verified: {summary}. It was written anyway "
                    "(--emulate auto); check it on the device (`slimc run`), or re-run with "
                    "--emulate-timeout SECONDS.")
    return {"ran_on": None, "passed": None, "reason": summary, "timed_out": exc.timed_out,
            "run_error": str(exc)[-2000:],
            **({"run_budget": exc.budget} if exc.budget else {})}


def _open_runner(backend, library: Path, spec: TargetSpec, threads: int):
    """The built library loaded once, for every verification run on this machine; None when
    it does not run here in-process (cross targets, a CPU lacking its instruction set, no
    device): :meth:`Backend.run` then reports why, as for a fixed-shape artifact."""
    if spec.is_cross:
        return None
    from slimc.isa import missing_features

    isa = backend.required_isa(spec)
    if isa and missing_features(isa):
        return None
    try:
        return backend.load(library, {"target": {"name": spec.name, "cross_triple": None},
                                      "isa": isa}, threads)
    except Exception:  # noqa: BLE001 - backend.run reports the failure in one paragraph
        return None


def _verify_other_shapes(ir: IR, library: Path, spec: TargetSpec,
                         check_inputs: list[torch.Tensor], options: CompileOptions,
                         threads: int, warnings: list[str], tolerance: float,
                         runner=None) -> dict[str, Any]:
    """Run a dynamic-shape artifact at the sizes :mod:`slimc.verify_sizes` picks, besides the
    one it was just checked at; returns the manifest's ``policy``, ``shapes`` and
    ``not_checked``.

    The example inputs pin each symbol to one value; kernels with symbolic extents have tails
    and guards that only other sizes exercise. Inputs are the example ones cut or tiled along
    their dynamic axes (valid token ids and masks stay valid). Under an emulator only the
    smallest size runs.
    """
    from dataclasses import replace

    from slimc import verify_sizes

    bounds: dict[str, tuple[int, int | None, int]] = {}  # symbol -> (min, max, checked size)
    for tensor_spec, value in zip(ir.input_specs(), check_inputs, strict=True):
        for axis, dim in enumerate(tensor_spec.dims or ()):
            if isinstance(dim, dict):
                bounds.setdefault(dim["name"], (int(dim.get("min") or 1), dim.get("max"),
                                                int(value.shape[axis])))
    checked = _symbol_sizes(ir, check_inputs)
    smallest = {name: low for name, (low, _, _) in bounds.items()}
    symbol = verify_sizes.primary_symbol(list(bounds))
    runs: dict[tuple, tuple[list[torch.Tensor], list[np.ndarray], float]] = {}

    def ir_run(sizes: dict[str, int]):
        key = tuple(sorted(sizes.items()))
        if key not in runs:
            from torch.utils.flop_counter import FlopCounterMode

            inputs = inputs_at(ir, check_inputs, sizes)
            with FlopCounterMode(display=False) as counter:
                outputs = [o.numpy() for o in ir.run(inputs)]
            runs[key] = (inputs, outputs, float(counter.get_total_flops()))
        return runs[key]

    if spec.is_cross:
        targets = [(smallest, "shortest")]
        not_checked = ("the largest sizes (checking them under the emulator would cost about as "
                       "much per token as the check itself; compile for the host, or run `slimc "
                       "run` on the device, to check them)")
    else:
        low, high, example = bounds[symbol]
        at = {name: size for name, (_, _, size) in bounds.items()}
        points = {}
        for n in sorted({max(low, min(high or example, n))
                         for n in (1, verify_sizes.ODD_LENGTH, example)}):
            # counted while the IR runs at lengths checked anyway; the example (checked
            # already) on fake tensors: shapes only, ~0.4 s for MiniLM against 1.5-3 s
            points[n] = (_fake_flops(ir, inputs_at(ir, check_inputs, {**at, symbol: n}))
                         if n == example else ir_run({**at, symbol: n})[2])
        cost = verify_sizes.fit_cost(points) if points[example] > 0 else None
        plan = verify_sizes.plan_lengths(symbol, example, low, high, cost)
        targets = [({**(smallest if role == "shortest" else at), symbol: n}, role)
                   for n, role in plan.lengths]
        not_checked = plan.not_checked
    results: list[dict[str, Any]] = []
    for sizes, role in targets:
        if sizes == checked or any(sizes == r["sizes"] for r in results):
            continue
        inputs, ir_outputs, _ = ir_run(sizes)
        result, _ = _verify_artifact(library, spec, [x.numpy() for x in inputs], ir_outputs,
                                     replace(options, verify_tolerance=tolerance), threads,
                                     warnings, runner=runner)
        results.append({"sizes": sizes, "role": role,
                        "relative_l2_vs_ir": result.get("relative_l2_vs_ir"),
                        "passed": result.get("passed")})
    return verify_sizes.verification_record(spec.is_cross, results, not_checked)


def _fake_flops(ir: IR, inputs: Sequence[torch.Tensor]) -> float:
    """The IR's FLOPs on ``inputs`` (torch's count of matmuls, convolutions, attention),
    computed on fake tensors: no arithmetic runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode, \
            FlopCounterMode(display=False) as counter:
        ir.run([mode.from_tensor(x) for x in inputs])
    return float(counter.get_total_flops())


#: Size of every dynamic dim (clamped into its bounds, never above the example's) of the input an
#: emulated cross artifact is checked on: a few tokens, a small batch.
EMULATED_CHECK_SIZE = 8


def _emulated_check_inputs(ir: IR, example_inputs: list[torch.Tensor], spec: TargetSpec,
                           options: CompileOptions) -> list[torch.Tensor]:
    """The inputs the built library is verified on.

    A cross artifact runs under an emulator, where every token costs ~100x what it costs
    natively (SmolLM2-135M: ~1 CPU-minute for 64 tokens under qemu). When its sizes are
    dynamic, any size in the bounds is a valid check, so it is checked on a short one
    (``EMULATED_CHECK_SIZE`` along each dynamic dim); fixed shapes, native targets and
    ``--emulate skip`` keep the example inputs (the same object, so callers can tell).
    """
    if not (spec.is_cross and ir.is_dynamic and options.emulate != "skip"):
        return example_inputs
    resized, changed = [], False
    for tensor_spec, value in zip(ir.input_specs(), example_inputs, strict=True):
        shape = list(value.shape)
        for axis, dim in enumerate(tensor_spec.dims or ()):
            if isinstance(dim, dict):
                short = max(int(dim.get("min") or 1), min(EMULATED_CHECK_SIZE, shape[axis]))
                changed |= short != shape[axis]
                shape[axis] = short
        resized.append(resize_tensor(value, shape))
    return resized if changed else example_inputs


def _symbol_sizes(ir: IR, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    sizes = {}
    for spec, value in zip(ir.input_specs(), inputs, strict=True):
        for axis, dim in enumerate(spec.dims or ()):
            if isinstance(dim, dict):
                sizes[dim["name"]] = int(value.shape[axis])
    return sizes


def inputs_at(ir: IR, inputs: Sequence[torch.Tensor], sizes: dict[str, int],
              ) -> list[torch.Tensor]:
    """``inputs`` with each dynamic dim set to its symbol's size in ``sizes``."""
    resized = []
    for spec, value in zip(ir.input_specs(), inputs, strict=True):
        shape = list(value.shape)
        for axis, dim in enumerate(spec.dims or ()):
            if isinstance(dim, dict) and dim["name"] in sizes:
                shape[axis] = int(sizes[dim["name"]])
        resized.append(resize_tensor(value, shape))
    return resized


def resize_tensor(value: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Cut or tile ``value`` to ``shape`` (repeating its contents along grown axes)."""
    reps = [-(-n // max(o, 1)) for n, o in zip(shape, value.shape, strict=True)]
    tiled = value.repeat(*reps) if any(r > 1 for r in reps) else value
    return tiled[tuple(slice(0, n) for n in shape)].contiguous()


def _pass_entry(record, ir: IR) -> dict[str, Any]:
    """A pass's record, plus what a transform annotated (per-layer formats, pruned units)."""
    entry = record.to_json()
    name = record.invocation.name
    if record.kind == "transform" and name in ir.annotations:
        entry["summary"] = ir.annotations[name]
    return entry


def _manifest(ir: IR, spec: TargetSpec, pipeline, records, before, after, fidelity,
              verification, library: Path, threads: int, timings, model: str,
              isa: dict[str, Any] | None = None) -> dict[str, Any]:
    target = spec.tvm_target()
    return {
        "slimc_version": slimc.__version__,
        "model": {"name": ir.name, "source": model, **ir.annotations.get("source", {})},
        "target": {"name": spec.name, "tvm": str(target), "cross_triple": spec.triple
                   if spec.is_cross else None, "host": platform.machine(),
                   "backend": spec.backend},
        "isa": isa,
        "inputs": [s.to_json() for s in ir.input_specs()],
        "outputs": [s.to_json() for s in ir.output_specs()],
        "pipeline": [_pass_entry(r, ir) for r in records],
        "params_before": before.params,
        "params_after": after.params,
        "weight_bytes_before": before.weight_bytes,
        "weight_bytes_after": after.weight_bytes,
        "fidelity": fidelity,
        "verification": verification,
        "library": library.name,
        "sha256": artifact.sha256_of(library),
        "library_bytes": library.stat().st_size,
        "threads": threads,
        "versions": {"torch": torch.__version__, "tvm": _tvm_version()},
        "timings": {k: round(v, 3) for k, v in timings.items()},  # moved to timings.json
    }


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                    "added_tokens.json")


def _copy_tokenizer(ir: IR, stage_dir: Path) -> str | None:
    """Ship the model's tokenizer with the artifact so `slimc run --text` works anywhere."""
    import shutil

    source = ir.annotations.get("source", {}).get("tokenizer")
    if not source:
        return None
    files = [Path(source) / f for f in _TOKENIZER_FILES if (Path(source) / f).is_file()]
    if not files:
        return None
    (stage_dir / "tokenizer").mkdir()
    for f in files:
        shutil.copy2(f, stage_dir / "tokenizer" / f.name)
    return "tokenizer"


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"
