"""The ``slimc`` command line: a thin layer over :mod:`slimc.compiler` and friends.

Exit codes: 0 success, 2 bad usage or bad input (one paragraph on stderr naming the problem and
the fix), 1 internal error (with a traceback, for a bug report).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from slimc.errors import SlimcError, UsageError

app = typer.Typer(
    name="slimc", no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
    help="slimc: compress and compile PyTorch / Hugging Face models through Apache TVM.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False, soft_wrap=True)


class Emulate(StrEnum):
    auto = "auto"
    require = "require"
    skip = "skip"


class Progress:
    """Stage-by-stage progress on stderr; silent with --quiet or when stdout is not a TTY."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._status = None
        self._current: tuple[str, float] | None = None

    def stage(self, name: str) -> None:
        self._finish()
        self._current = (name, time.perf_counter())
        if self.enabled and self._status is not None:
            self._status.update(f"[bold]{name}[/bold] ...")

    def update(self, detail: str) -> None:
        """Refresh the status line within the current stage (e.g. tuning trials)."""
        if self.enabled and self._status is not None and self._current:
            self._status.update(f"[bold]{self._current[0]}[/bold] {detail}")

    def _finish(self) -> None:
        if self._current and self.enabled:
            name, start = self._current
            err_console.print(f"  [green]done[/green] {name} ({time.perf_counter() - start:.1f}s)")
        self._current = None

    @contextmanager
    def running(self):
        if not self.enabled:
            yield self
            return
        with err_console.status("starting ...") as status:
            self._status = status
            try:
                yield self
                self._finish()
            finally:
                self._status = None


#: ``slimc --verbose``: pass logs on stderr even when stdout is not a terminal.
_VERBOSE = False


def _cmake_dir_callback(value: bool) -> None:
    if value:
        print(Path(__file__).resolve().parent / "cmake")
        raise typer.Exit(0)


def _version_callback(value: bool) -> None:
    if value:
        from importlib import metadata

        import slimc

        try:
            tvm = metadata.version("apache-tvm")
        except metadata.PackageNotFoundError:
            tvm = "not installed"
        print(f"slimc {slimc.__version__} (TVM {tvm}, Python {sys.version.split()[0]})")
        raise typer.Exit(0)


@app.callback()
def _global_options(
    plugins: Annotated[str | None, typer.Option(
        "--plugins", metavar="A,B", help="Load only these third-party plugins (entry-point "
        "names; also $SLIMC_PLUGINS).")] = None,
    no_plugins: Annotated[bool, typer.Option(
        "--no-plugins", help="Load no third-party plugins (also $SLIMC_NO_PLUGINS=1).")] = False,
    version: Annotated[bool, typer.Option("--version", "-V", callback=_version_callback,
                                          is_eager=True, help="Print the version and exit.")]
    = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every step on stderr "
                                          "(also when output is piped).")] = False,
    cmake_dir: Annotated[bool, typer.Option(
        "--cmake-dir", callback=_cmake_dir_callback, is_eager=True,
        help="Print the folder of slimc's CMake module (SlimcConfig.cmake) and exit.")] = False,
) -> None:
    """slimc: compress and compile PyTorch / Hugging Face models through Apache TVM.

    Results go to stdout (one JSON object with --json, errors included); progress and logs go
    to stderr. Exit codes: 0 ok, 2 bad usage or input, 1 internal error.
    """
    from slimc import plugins as plugin_registry

    global _VERBOSE
    _VERBOSE = verbose
    if no_plugins:
        plugin_registry.cli_selection = ()
    elif plugins is not None:
        plugin_registry.cli_selection = tuple(p.strip() for p in plugins.split(",") if p.strip())
    else:
        plugin_registry.cli_selection = None


def _show_progress(quiet: bool) -> bool:
    return not quiet and (sys.stdout.isatty() or _VERBOSE)


@app.command("compile")
def compile_command(
    model: Annotated[str, typer.Argument(help="HF model directory, package.module:factory, "
                                         "or a .pt2 file from torch.export.save.")],
    target: Annotated[str | None, typer.Option(
        "--target", "-t", help="Target name/alias (see `slimc targets`), TVM tag, or TVM JSON "
        "dict (default: the recipe's target, else llvm = this machine).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output directory "
                                                "(default ./<model-name>.slimc).")] = None,
    pipeline: Annotated[str | None, typer.Option(
        "--pipeline", "-p", help='Passes to run, e.g. "eliminate-dead-code,pass{opt=1}".')] = None,
    recipe: Annotated[Path | None, typer.Option(
        "--recipe", help="YAML/TOML recipe: a `pipeline` list and optional target, threads, "
        "inputs (command-line flags win over the recipe). Not together with --pipeline.")] = None,
    opt_level: Annotated[str, typer.Option(
        "-O", metavar="LEVEL", help=
        "Optimisation level when no pipeline is given. -O0 (default): lower only, the artifact "
        "computes what the model does. -O1: lossless (shared tensors stored once, weights that "
        "already lie on a format's grid stored in it: a dequantized GGUF's int4, a bf16 "
        "checkpoint's bf16; dead code removed). -O2: automatic: per-layer int8/int4/fp32 chosen"
        " by measurement, the smallest weights within --max-drop (default 1%). -O3: aggressive:"
        " pruning, low-rank and per-layer precision, the lowest target latency within --max-"
        "drop (default 3%). -Os: as -O3 but the smallest weights within --max-drop (default "
        "1%). Levels 2/3/s measure the drop on --eval-data, or a proxy (output divergence on "
        "calibration data) without it.")] = "0",
    budget: Annotated[str | None, typer.Option(
        "--budget", metavar="size=X,latency=Y,params=Z", help="Let slimc choose the pipeline: "
        "limits relative to the original model (size: weight bytes, latency: the target's "
        "cost model, params: parameter count), combinable. Per layer it picks pruning, low "
        "rank and precision from measured damage and the target's costs, builds the result "
        "and backs off until the budget and --max-drop hold (exit 2 with advice when nothing "
        "does). The chosen recipe is written to OUT/recipe.yaml.")] = None,
    inputs: Annotated[list[str] | None, typer.Option(
        "--input", "-i", help="Example input NAME=SHAPE:DTYPE, e.g. input_ids=1x128:int64; "
        "LO..HI makes a dim dynamic, e.g. input_ids=1x1..512:int64 (repeatable).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Runtime threads for verification "
                                                "(default: TVM_NUM_THREADS or all cores).")] = None,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", min=1, help="Cores the compiler "
                                             "itself uses: calibration, searches, analyses "
                                             "(default: all).")] = None,
    verify_tol: Annotated[float, typer.Option(min=0.0, help="Largest relative L2 error between "
                                              "artifact and IR.")] = 1e-3,
    emulate: Annotated[Emulate, typer.Option(help="Run cross-target artifacts under qemu to "
                                             "verify them: auto, require or skip.")] = Emulate.auto,
    emulate_timeout: Annotated[float | None, typer.Option(
        "--emulate-timeout", metavar="SECONDS", help="Stop the emulated verification run after "
        "this long (default: from the model's FLOPs; env SLIMC_EMULATE_TIMEOUT).")] = None,
    save_ir: Annotated[bool, typer.Option("--save-ir", help="Also write the final IR as "
                                          "ir.pt2.")] = False,
    calib: Annotated[Path | None, typer.Option(
        "--calib", help="Calibration data for passes that need activations: a text file "
        "(tokenized with the model's tokenizer), .npy/.npz, or a folder of images.")] = None,
    calib_batches: Annotated[int, typer.Option(min=1, help="Most calibration batches to "
                                               "read.")] = 8,
    eval_data: Annotated[Path | None, typer.Option(
        "--eval-data", help="Score the task on this data, for the original model and the "
        "artifact: a text file (perplexity), a TSV/CSV of text1,text2,score pairs (Spearman), or "
        "a folder of <label>/<image> files (top-1/top-5 accuracy).")] = None,
    eval_kind: Annotated[str | None, typer.Option(
        "--eval", metavar="KIND", help="Task metric: perplexity, spearman, accuracy, or "
        "module:function for your own (function(model, data_path) -> number). Default: chosen "
        "from --eval-data.")] = None,
    eval_batches: Annotated[int, typer.Option(min=1, help="Most batches of --eval-data to "
                                              "score.")] = 16,
    max_drop: Annotated[float | None, typer.Option(
        "--max-drop", min=0.0, help="Fail (exit 2, no artifact) when the task metric gets worse "
        "by more than this share of the original value: 0.02 = 2% (for perplexity, a 2% "
        "rise). With --budget or -O2/-O3/-Os it bounds the search (on a proxy, output "
        "divergence on calibration data, when there is no --eval-data).")] = None,
    distill_budget: Annotated[float | None, typer.Option(
        "--distill-budget", metavar="SECONDS", min=0.0, help="With --budget or -O2/-O3/-Os: "
        "when no candidate meets --max-drop, spend up to this long distilling the closest "
        "ones from the original model on --calib (needs 2+ calibration batches); the step "
        "count is sized from a measured step time. 0: never (default 300).")] = None,
    tune: Annotated[int, typer.Option("--tune", metavar="N", help="Tune the most expensive "
                                      "kernels with MetaSchedule for N trials in all; records "
                                      "are kept and reused by later compiles.")] = 0,
    tune_minutes: Annotated[float | None, typer.Option(
        "--tune-minutes", help="Stop tuning after this many minutes.")] = None,
    tune_db: Annotated[Path | None, typer.Option(
        "--tune-db", help="Tuning database folder to read and extend (default: per target "
        "under ~/.cache/slimc/tuning, or $SLIMC_CACHE_DIR/tuning).")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Reuse an identical earlier "
                                        "compile from the compile cache ($SLIMC_CACHE_DIR/"
                                        "compile, else ~/.cache/slimc/compile).")] = True,
    bundle: Annotated[bool, typer.Option(
        "--bundle", help="Also write OUT/runtime/: the TVM runtime libraries for the target and "
        "a prebuilt C runner (slimc_run), so the device needs no Python (docs/deploy.md).")]
    = False,
    depfile: Annotated[Path | None, typer.Option(
        "--depfile", help="Write a Make-syntax depfile listing every file the compile read "
        "(target: OUTPUT/model.so).")] = None,
    generate: Annotated[bool, typer.Option(
        "--generate", help="Causal LMs: build prefill + decode entry points over a KV cache "
        "for `slimc generate` instead of one fixed-length forward pass.")] = False,
    max_length: Annotated[int | None, typer.Option(
        "--max-length", min=2, help="With --generate: KV cache length, prompt + new tokens "
        "(default: 512, capped by the model's maximum positions).")] = None,
    prefill_length: Annotated[int | None, typer.Option(
        "--prefill-length", min=1, help="With --generate: prompt tokens per prefill call "
        "(longer prompts are fed in chunks; default 128).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest summary as one "
                                          "JSON object.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code", help="Run Python code shipped with a Hugging Face model folder "
        "(auto_map). Off by default: never run a stranger's code.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing artifact even if it holds files slimc did not "
        "write (they are deleted). Never replaces a directory slimc did not write.")] = False,
) -> None:
    """Compile MODEL for a target: capture, run passes, lower through TVM, verify, write."""
    from slimc.api import CompileOptions, compile_model

    options = CompileOptions(target=target, pipeline=pipeline, recipe=recipe,
                             opt_level=opt_level, budget=budget, inputs=tuple(inputs or ()),
                             output=output,
                             threads=threads, jobs=jobs, verify_tolerance=verify_tol,
                             emulate=emulate.value,
                             emulate_timeout=emulate_timeout, save_ir=save_ir, calib=calib,
                             calib_batches=calib_batches, eval_data=eval_data,
                             eval_kind=eval_kind, eval_batches=eval_batches, max_drop=max_drop,
                             distill_budget=distill_budget,
                             tune=tune, tune_minutes=tune_minutes, tune_db=tune_db,
                             trust_remote_code=trust_remote_code, force=force,
                             cache=cache, depfile=depfile, bundle=bundle,
                             generate=generate, max_length=max_length,
                             prefill_length=prefill_length)
    if not generate and (max_length or prefill_length):
        raise UsageError("--max-length and --prefill-length only apply with --generate.",
                         hint="Add --generate to build a text-generation artifact.")
    progress = Progress(_show_progress(quiet) and not as_json)
    try:
        with progress.running():
            result = compile_model(model, options, stage=progress.stage,
                                   log=(lambda m: None) if quiet else _log_verbose,
                                   progress=progress.update)
    finally:
        # Name disabled plugins whenever the compile loaded them (a cache hit loads none,
        # which keeps an unchanged recompile free of torch/TVM imports).
        from slimc.plugins import loaded_registries

        if not as_json:
            for registry in loaded_registries():
                _print_broken([{"plugin": b.name, "reason": b.reason} for b in registry.broken])
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {warning}")
    m = result.manifest
    if as_json:
        summary = {k: m[k] for k in ("slimc_version", "target", "inputs", "outputs", "pipeline",
                                     "params_before", "params_after", "weight_bytes_before",
                                     "weight_bytes_after", "fidelity", "verification",
                                     "library", "sha256")}
        summary["quality"] = m.get("quality")
        summary["timings"] = result.timings.get("stages", {})
        summary["cached"] = result.cached
        summary["output"] = str(result.output)
        summary["tuning"] = m.get("tuning")
        print(json.dumps(summary))
    elif not quiet:
        v = m["verification"]
        k = v.get("kernels") if v.get("method") == "per-kernel" else None
        checked = (f"verified kernel by kernel on {v['ran_on']}: {k['checked']}/{k['total']} "
                   f"distinct kernels match their host build (worst rel. L2 "
                   f"{k['worst_relative_l2']:.2g}), whole model on the host: rel. L2 "
                   f"{v['relative_l2_vs_ir']:.2g}" if k and v.get("passed") else
                   f"verified on {v['ran_on']}: matches slimc's compressed graph "
                   f"(rel. L2 {v['relative_l2_vs_ir']:.2g})"
                   if v.get("passed") else "NOT verified" if v.get("run_error")
                   else "NOT run")
        cached = ", from the compile cache" if result.cached else ""
        out_console.print(f"wrote {result.output} ({m['target']['name']}, "
                          f"{m['params_after']:,} params, {checked}{cached})", markup=False)
        f = m.get("fidelity") or {}
        if "relative_l2" in f:
            out_console.print(f"fidelity vs the original model (one example input): rel. L2 "
                              f"{f['relative_l2']:.3g}, cosine {f.get('cosine', 1.0):.4f}",
                              markup=False)
        if m.get("quality"):
            from slimc.task_eval import describe

            out_console.print(describe(m["quality"]), markup=False)
        if m.get("search"):
            _print_search(m["search"], result.output)
        if m.get("tuning"):
            t = m["tuning"]
            out_console.print(f"tuning: {t['trials']} trials run, {t['records_applied']} of "
                              f"{t['kernels']} kernels from {t['database']}", markup=False)


def _print_search(entry: dict, output: Path) -> None:
    chosen = entry.get("chosen")
    if chosen is None:
        why = entry.get("why_none") or "nothing stayed within the allowed drop"
        out_console.print(f"search ({entry['request']}): {why}; compiled losslessly",
                          markup=False)
        return
    rel = chosen["relative"]
    parts = [f"size {rel['size']:.1%}", f"params {rel['params']:.1%}"]
    if "latency" in rel:
        parts.append(f"latency {rel['latency']:.1%} (cost model)")
    out_console.print(f"search ({entry['request']}): {len(entry['candidates'])} candidates "
                      f"measured; chose {chosen['pipeline']} -> {', '.join(parts)} of the "
                      f"original, {entry['metric']['kind']} drop {chosen['drop']:.2%}"
                      f"{_metric_note(entry['metric'])}; recipe {output / 'recipe.yaml'}",
                      markup=False)


def _metric_note(metric: dict) -> str:
    """What a proxy drop measured: on a language model it is the KL divergence of the
    next-token distribution, which can be 0.01% while the raw logits' rel. L2 on the
    fidelity line is 10% (random tiny models have near-uniform logits)."""
    if metric.get("kind") != "proxy" or not metric.get("label"):
        return ""
    return f" ({str(metric['label']).removeprefix('proxy: ')})"


def _log_verbose(message: str) -> None:
    if _show_progress(False):
        err_console.print(f"  {message}", style="dim")


@app.command("analyze")
def analyze_command(
    model: Annotated[str, typer.Argument(help="HF model directory, package.module:factory, "
                                         "or a .pt2 file from torch.export.save.")],
    target: Annotated[str, typer.Option("--target", "-t", help="Target name/alias; picks the "
                                        "hardware numbers (see backends/hardware.toml).")] = "llvm",
    hardware: Annotated[str | None, typer.Option(help="Hardware entry to cost on, overriding "
                                                 "the target's (e.g. h100, jetson-orin).")] = None,
    calib: Annotated[Path | None, typer.Option(help="Calibration data: text file, .npy/.npz, or "
                                               "a folder of images (default: synthetic).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output directory "
                                                "(default ./<model-name>.analysis).")] = None,
    criteria: Annotated[str, typer.Option(help="Comma-separated sensitivity criteria.")] =
        "magnitude,activation,taylor,hessian,perturbation",
    bits: Annotated[str, typer.Option(help="Weight bit widths to score, comma-separated.")] =
        "8,4,3,2",
    keep_ratios: Annotated[str, typer.Option(help="Output-channel keep ratios to score.")] =
        "0.75,0.5",
    rank_ratios: Annotated[str, typer.Option(help="SVD rank ratios to score.")] = "0.5,0.25",
    batch_size: Annotated[int, typer.Option(min=1, help="Calibration batch size.")] = 4,
    max_batches: Annotated[int, typer.Option(min=1, help="Calibration batches used.")] = 2,
    seq_len: Annotated[int, typer.Option(min=1, help="Tokens per text sample.")] = 128,
    inputs: Annotated[list[str] | None, typer.Option(
        "--input", "-i", help="Example input NAME=SHAPE:DTYPE (repeatable).")] = None,
    measure: Annotated[bool, typer.Option("--measure", help="Build and time each op's TVM kernel "
                                          "on the target (cached); measured times replace "
                                          "the roofline.")] = False,
    rpc: Annotated[str | None, typer.Option(help="HOST:PORT of a TVM RPC server on the device "
                                            "to time kernels on (with --measure).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Runtime threads for local "
                                                "kernel timing.")] = None,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", min=1, help="Cores the analysis "
                                             "uses (default: all).")] = None,
    perturbation: Annotated[str, typer.Option(help="Layers the perturbation criterion "
                                              "measures: 'disagree' (where magnitude, taylor "
                                              "and hessian rank them differently, a proxy "
                                              "unlike taylor left out; plus anchors) or "
                                              "'all'.")] = "disagree",
    as_json: Annotated[bool, typer.Option("--json", help="Print a summary as one JSON "
                                          "object.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Analyse MODEL: per-layer cost on the target and sensitivity to compression."""
    from slimc.analyze import AnalyzeOptions, analyze_model

    options = AnalyzeOptions(
        target=target, hardware=hardware, calib=calib, output=output,
        criteria=_csv(criteria, str, "--criteria"), bits=_csv(bits, int, "--bits"),
        keep_ratios=_csv(keep_ratios, float, "--keep-ratios"),
        rank_ratios=_csv(rank_ratios, float, "--rank-ratios"), batch_size=batch_size,
        max_batches=max_batches, seq_len=seq_len, inputs=tuple(inputs or ()),
        measure=measure or rpc is not None, rpc=rpc, threads=threads, jobs=jobs,
        perturbation=perturbation)
    progress = Progress(_show_progress(quiet) and not as_json)
    with progress.running():
        result = analyze_model(model, options, stage=progress.stage)
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {warning}")
    a = result.analysis
    if as_json:
        print(json.dumps({"output": str(result.output), "hardware": a["cost"]["hardware"]["name"],
                          "total": a["cost"]["total"], "compress_first": a["compress_first"],
                          "criteria_rank_correlation": a["criteria_rank_correlation"],
                          "measured": a["cost"].get("measured"),
                          "groups": {n: {"kind": g["kind"], "units": g["units"],
                                         "sensitivity": g["sensitivity"]}
                                     for n, g in a.get("groups", {}).items()},
                          "seconds": a["seconds"]}))
    elif not quiet:
        _print_groups(a)
        out_console.print(f"wrote {result.output} (analysis.json, report.md, plots) in "
                          f"{a['seconds']:.1f}s")


def _print_groups(analysis: dict) -> None:
    """The prunable groups table of ``slimc analyze`` (least damaged first), as plain text so
    it survives narrow terminals and pipes."""
    from slimc.analyze import group_table, primary_criterion

    criterion = primary_criterion(analysis)
    header, rows = group_table(analysis, criterion, top=12)
    if not rows:
        return
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out_console.print(f"prunable groups ({criterion}: output damage at each keep ratio, least "
                      f"damaged first; all {len(analysis['groups'])} in analysis.json)",
                      markup=False)
    for row in [header, *rows]:
        out_console.print("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                    for i, (c, w) in enumerate(zip(row, widths, strict=True))),
                          markup=False)


def _csv(text: str, kind, option: str) -> tuple:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return tuple(kind(t) for t in items)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a comma-separated list of "
                         f"{kind.__name__} values.") from None


@app.command("explore")
def explore_command(
    model: Annotated[str, typer.Argument(help="HF model directory, package.module:factory, "
                                         "or a .pt2 file from torch.export.save.")],
    target: Annotated[str, typer.Option("--target", "-t", help="Target whose cost model "
                                        "prices latency (see `slimc targets`).")] = "llvm",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output directory "
                                                "(default ./<model-name>.explore).")] = None,
    inputs: Annotated[list[str] | None, typer.Option(
        "--input", "-i", help="Example input NAME=SHAPE:DTYPE (repeatable).")] = None,
    calib: Annotated[Path | None, typer.Option("--calib", help="Calibration data (text, "
                                               ".npy/.npz, image folder).")] = None,
    calib_batches: Annotated[int, typer.Option(min=1, help="Most calibration batches.")] = 8,
    eval_data: Annotated[Path | None, typer.Option(
        "--eval-data", help="Task data to measure every point on (as for compile); without "
        "it a proxy: output divergence on calibration data.")] = None,
    eval_kind: Annotated[str | None, typer.Option("--eval", metavar="KIND", help="Task "
                                                  "metric (as for compile).")] = None,
    eval_batches: Annotated[int, typer.Option(min=1, help="Most batches of --eval-data.")] = 16,
    sizes: Annotated[str, typer.Option(help="Size budgets to sweep (relative weight "
                                       "bytes).")] = "0.5,0.35,0.25,0.18,0.13,0.1",
    latencies: Annotated[str, typer.Option(help="Latency budgets to sweep (relative, cost "
                                           "model).")] = "0.9,0.75,0.6,0.5",
    precision_only: Annotated[bool, typer.Option(
        "--precision-only", help="Only per-layer precision (as -O2), no pruning or low "
        "rank: faster.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print explore.json's summary as "
                                          "one JSON object.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
) -> None:
    """The Pareto front of task quality vs size and vs latency (JSON + PNG); every point has
    a recipe that `slimc compile MODEL --recipe` reproduces."""
    from slimc.search.explore import ExploreOptions, explore_model

    options = ExploreOptions(
        target=target, inputs=tuple(inputs or ()), output=output, calib=calib,
        calib_batches=calib_batches, eval_data=eval_data, eval_kind=eval_kind,
        eval_batches=eval_batches, sizes=_csv(sizes, float, "--sizes"),
        latencies=_csv(latencies, float, "--latencies"),
        techniques="precision" if precision_only else "all",
        trust_remote_code=trust_remote_code)
    progress = Progress(_show_progress(quiet) and not as_json)
    with progress.running():
        result = explore_model(model, options, stage=progress.stage,
                               log=(lambda m: None) if quiet else _log_verbose)
    if as_json:
        print(json.dumps({k: result[k] for k in ("output", "model", "target", "metric",
                                                 "pareto", "points")}, default=str))
        return
    if quiet:
        return
    points = result["points"]
    metric = result["metric"]
    out_console.print(f"{len(points)} points measured ({metric['label']}); Pareto front by "
                      "size:", markup=False)
    for i in result["pareto"]["size"]:
        p = points[i]
        lat = p["relative"].get("latency")
        out_console.print(f"  {p['id']}: size {p['relative']['size']:.3f}"
                          + (f", latency {lat:.3f}" if lat is not None else "")
                          + f", {metric['kind']} {p['value']:.4g} (drop {p['drop']:.2%}): "
                          f"{p['pipeline']}", markup=False)
    out_console.print(f"wrote {result['output']} (explore.json, pareto.png, recipes/)",
                      markup=False)


@app.command("run")
def run_command(
    artifact_dir: Annotated[Path, typer.Argument(help="Directory written by `slimc compile`.")],
    inputs: Annotated[list[str] | None, typer.Option(
        "--input", "-i", help="NAME=file.npy (repeatable); default: the stored example "
        "inputs.")] = None,
    texts: Annotated[list[str] | None, typer.Option(
        "--text", help="Text to tokenize with the artifact's tokenizer (one per batch "
        "row).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write outputs as "
                                                "NAME.npy into this directory.")] = None,
    threads: Annotated[int | None, typer.Option(min=1)] = None,
    emulate: Annotated[bool, typer.Option(help="Run a cross-target artifact under qemu.")] = False,
    rpc: Annotated[str | None, typer.Option(
        "--rpc", metavar="HOST:PORT", help="Run on the device behind a TVM RPC server "
        "(python -m tvm.exec.rpc_server there; see docs/deploy.md).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print output summaries as "
                                          "JSON.")] = False,
) -> None:
    """Run a compiled artifact on the host (or under qemu with --emulate)."""
    import numpy as np

    from slimc.artifact import load
    from slimc.npy import read_npy

    model = load(artifact_dir, threads=threads, emulate=emulate, rpc=rpc)
    feed = model.tokenize(texts) if texts else model.example_inputs()
    for item in inputs or ():
        name, eq, path = item.partition("=")
        if not eq:
            raise UsageError(f"--input {item!r} is not NAME=file.npy.")
        feed[name] = read_npy(path, f"--input {name}")
        if name not in {i["name"] for i in model.inputs}:
            raise UsageError(f"Unknown input {name!r}; the model's inputs are "
                             f"{', '.join(i['name'] for i in model.inputs)}.")
    start = time.perf_counter()
    outputs = model(**feed)
    seconds = time.perf_counter() - start
    if output:
        output.mkdir(parents=True, exist_ok=True)
        for name, value in outputs.items():
            np.save(output / f"{name}.npy", value)
    summary = {name: {"shape": list(v.shape), "dtype": str(v.dtype),
                      "mean": float(np.mean(v)) if v.size else 0.0,
                      "first": v.ravel()[:5].tolist()} for name, v in outputs.items()}
    if as_json:
        print(json.dumps({"outputs": summary, "seconds": seconds}))
    else:
        for name, s in summary.items():
            out_console.print(f"{name}: shape {s['shape']} {s['dtype']}, mean {s['mean']:.6g}, "
                              f"first {[round(x, 5) for x in s['first']]}")
        out_console.print(f"({seconds * 1000:.1f} ms)")


@app.command("generate")
def generate_command(
    artifact_dir: Annotated[Path, typer.Argument(help="Directory written by `slimc compile "
                                                 "--generate`.")],
    prompt: Annotated[str | None, typer.Option("--prompt", help="Prompt text (tokenized with "
                                               "the artifact's tokenizer).")] = None,
    prompt_ids: Annotated[str | None, typer.Option(
        "--prompt-ids", metavar="ID,ID,...", help="The prompt as token ids, comma-separated "
        "(for an artifact built without a tokenizer).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1)] = 32,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy (default).")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample among the k most "
                                       "likely tokens (0: all).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus "
                                         "sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Do not stop at the "
                                             "model's end-of-sequence tokens.")] = False,
    threads: Annotated[int | None, typer.Option(min=1)] = None,
    emulate: Annotated[bool, typer.Option(help="Run a cross-target artifact under qemu.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON "
                                          "object instead of streaming text.")] = False,
) -> None:
    """Generate text with a --generate artifact: streams tokens, reports tokens/s."""
    from slimc.artifact import load

    if (prompt is None) == (prompt_ids is None):
        raise UsageError("slimc generate needs exactly one of --prompt and --prompt-ids.",
                         hint="--prompt 'text' (the artifact's tokenizer) or --prompt-ids "
                         "1,2,3 (token ids).")
    tokens = None
    if prompt_ids is not None:
        try:
            tokens = [int(t) for t in prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            tokens = []
        if not tokens or min(tokens) < 0:
            raise UsageError(f"--prompt-ids {prompt_ids!r} is not a list of token ids.",
                             hint="Give non-negative integers separated by commas: "
                             "--prompt-ids 1,2,3.")
    model = load(artifact_dir, threads=threads, emulate=emulate)

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = model.generate(tokens if tokens is not None else prompt, max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            stop=not ignore_eos,
                            on_text=None if as_json or tokens is not None else show)
    s = result.stats
    if as_json:
        print(json.dumps({"text": result.text, "tokens": result.tokens, "stats": s}))
        return
    if tokens is not None:  # ids in, ids out
        sys.stdout.write(" ".join(str(t) for t in result.tokens))
    sys.stdout.write("\n")
    decode = (f"{s['decode_tokens_per_s']:.1f} tokens/s" if s["decode_tokens_per_s"]
              else "n/a")
    err_console.print(f"prefill: {s['prompt_tokens']} tokens in {s['prefill_s'] * 1000:.1f} ms "
                      f"({s['prefill_tokens_per_s']:.1f} tokens/s); decode: {s['new_tokens']} "
                      f"tokens, {decode}; stopped: {s['stop_reason']}", markup=False)


@app.command("bench")
def bench_command(
    artifact_dir: Annotated[Path, typer.Argument(help="Directory written by `slimc compile`.")],
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs.")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs first.")] = 2,
    threads: Annotated[int | None, typer.Option(min=1)] = None,
    rpc: Annotated[str | None, typer.Option(
        "--rpc", metavar="HOST:PORT", help="Time on the device behind a TVM RPC server "
        "(see docs/deploy.md).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Time an artifact on its example inputs (generation: prefill ms, decode tokens/s)."""
    from slimc.bench import bench

    report = bench(artifact_dir, runs=runs, warmup=warmup, threads=threads, rpc=rpc)
    if as_json:
        print(json.dumps(report))
        return
    if "forward" in report:
        f = report["forward"]
        out_console.print(f"{report['where']}: median {f['median_ms']:.3f} ms, p10 "
                          f"{f['p10_ms']:.3f} ms, p90 {f['p90_ms']:.3f} ms ({runs} runs, "
                          f"{warmup} warm-up)", markup=False)
        return
    g = report["generation"]
    decode = (f"{g['decode_tokens_per_s']:.1f} tokens/s" if g["decode_tokens_per_s"]
              else "n/a")
    out_console.print(f"{report['where']}: prefill {g['prompt_tokens']} tokens median "
                      f"{g['prefill']['median_ms']:.3f} ms (p10 {g['prefill']['p10_ms']:.3f}, "
                      f"p90 {g['prefill']['p90_ms']:.3f}); decode {g['new_tokens']} tokens "
                      f"{decode} ({runs} runs, {warmup} warm-up)", markup=False)


@app.command("passes")
def passes_command(
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List every registered pass with its options and the plugin that provides it."""
    from slimc.pipeline import describe_options
    from slimc.plugins import get_registry

    registry = get_registry()
    rows = [{"name": name, "kind": cls.kind, "summary": cls.summary(),
             "plugin": registry.provided_by("pass", name),
             "exact": getattr(cls, "exact", None) if cls.kind == "transform" else None,
             "options": describe_options(cls)}
            for name, cls in sorted(registry.passes.items())]
    broken = [{"plugin": b.name, "reason": b.reason} for b in registry.broken]
    if as_json:
        print(json.dumps({"passes": rows, "broken_plugins": broken}, default=str))
        return
    for row in rows:
        out_console.print(f"[bold]{row['name']}[/bold] ({row['kind']}, from {row['plugin']}): "
                          f"{row['summary']}")
        for o in row["options"]:
            bounds = "".join(f", {k} {v}" for k, v in o["constraints"].items())
            out_console.print(f"    {o['name']}: {o['type']} = {o['default']!r}{bounds}"
                              + (f"  {o['help']}" if o["help"] else ""))
    _print_broken(broken)


def _print_broken(broken: list[dict]) -> None:
    for b in broken:
        err_console.print(f"[yellow]warning:[/yellow] plugin {b['plugin']!r} is disabled: "
                          f"{b['reason']}")


@app.command("targets")
def targets_command(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List compilation targets (TVM target tags are accepted too)."""
    from slimc.plugins import get_registry

    registry = get_registry()
    specs = {id(s): s for s in registry.targets.values()}.values()
    rows = [{**s.to_json(), "plugin": registry.provided_by("target", s.name.lower()),
             **_describe_target(s, registry)} for s in specs]
    if as_json:
        print(json.dumps({"targets": rows}))
        return
    for r in rows:
        aliases = f" (aliases: {', '.join(r['aliases'])})" if r["aliases"] else ""
        state = "" if r.get("available", True) else " [red]not available[/red]"
        out_console.print(f"[bold]{r['name']}[/bold]{aliases}{state}: {r['description']}")
        if not r.get("available", True):
            out_console.print(f"    why: {r['reason']}", markup=False, highlight=False)
        for key, label in (("compiles_to", "compiles to"), ("build_needs", "build needs"),
                           ("run_needs", "run needs"), ("verified_by", "verified by")):
            if r.get(key):
                out_console.print(f"    {label}: {r[key]}", markup=False, highlight=False)
    out_console.print("Also accepted: any TVM target tag (e.g. raspberry-pi/4b-aarch64) or a "
                      "TVM target JSON dict.")
    _print_broken([{"plugin": b.name, "reason": b.reason} for b in registry.broken])


def _describe_target(spec, registry) -> dict:
    """The backend's compiles-to / needs / verification summary of ``spec``."""
    backend = registry.backends.get(spec.backend.lower())
    if backend is None:
        return {"available": False, "reason": f"no installed backend {spec.backend!r}"}
    return backend.describe(spec).to_json()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: the one error boundary of the CLI.

    Maps slimc errors to exit codes and one-paragraph messages (user-fixable OS errors such as a
    full disk or a read-only -o included), and SIGINT/SIGTERM to 130/143 even when native code
    swallowed the interrupt (see :mod:`slimc.interrupts`).
    """
    from slimc import interrupts

    try:
        with interrupts.handle_signals() as state:
            code = _run(argv)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", None) or interrupts.received() or 2
        return _interrupted(signum)
    if state.signum is not None:  # typer turned the KeyboardInterrupt into its exit code 130
        return _interrupted(state.signum)
    return code


def _interrupted(signum: int) -> int:
    import signal

    err_console.print(f"[red]interrupted[/red] ({signal.Signals(signum).name}); any existing "
                      "output was left as it was.")
    return 128 + signum


def _run(argv: list[str] | None) -> int:
    from slimc import interrupts

    args = sys.argv[1:] if argv is None else list(argv)
    try:
        rv = app(args=args, prog_name="slimc", standalone_mode=False)
    except BaseException as exc:  # noqa: BLE001 - the CLI's one error boundary
        if interrupts.received() is not None:  # whatever native code made of the interrupt
            raise interrupts.Interrupted(interrupts.received()) from exc
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return _report(exc, as_json="--json" in args)
    return rv if isinstance(rv, int) else 0


def _report(exc: BaseException, as_json: bool = False) -> int:
    """Print ``exc`` the way its kind deserves; return the exit code. With ``--json`` the error
    is the command's one result on stdout: ``{"error": ..., "hint": ..., "exit_code": N}``."""
    from slimc.outdir import disk_full_error, explain_os_error

    if isinstance(exc, SlimcError):
        if as_json:
            _print_json_error(exc.message, exc.hint, exc.exit_code)
        else:
            err_console.print(f"[red]error:[/red] {exc}")
        return exc.exit_code
    if isinstance(exc, typer.Exit):
        return exc.exit_code
    if isinstance(exc, typer.Abort):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, EOFError):  # click turns an EOFError into Abort: not a Ctrl-C
            return _report(cause, as_json)
        return 130
    # typer vendors click (typer._click), so match click's usage errors by shape.
    if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
        if as_json:
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            _print_json_error(message, "See `slimc COMMAND --help`.", exc.exit_code)
        else:
            exc.show()
        return exc.exit_code
    user_error = disk_full_error(exc) or next(
        (explain_os_error(e) for e in _chain(exc)
         if isinstance(e, OSError) and explain_os_error(e)), None)
    if user_error is not None:
        if as_json:
            _print_json_error(user_error.message, user_error.hint, user_error.exit_code)
        else:
            err_console.print(f"[red]error:[/red] {user_error}")
        return user_error.exit_code
    traceback.print_exception(exc)
    if as_json:
        _print_json_error(f"internal error: {type(exc).__name__}: {exc}", "This is a bug in "
                          "slimc (or a plugin); please report it with the command line.", 1)
    err_console.print(f"[red]internal error:[/red] {type(exc).__name__}: {exc}. This is a "
                      "bug in slimc (or a plugin); please report it with the command line.")
    return 1


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _print_json_error(message: str, hint: str | None, exit_code: int) -> None:
    """With --json, an error is the command's one JSON result (on stdout, like a success)."""
    print(json.dumps({"error": message, "hint": hint, "exit_code": exit_code}))


if __name__ == "__main__":
    sys.exit(main())
