"""MetaSchedule tuning (``slimc compile --tune N``) and the persistent tuning database.

A tuning database is a folder holding TVM's JSON database (``database_workload.json`` and
``database_tuning_record.json``, one JSON value per line). Each record names its target and its
workload (a fused kernel, compared structurally), so one folder can serve several targets; the
default folder is per target anyway: ``~/.cache/slimc/tuning/<target-hash>/`` (the root moves
with ``SLIMC_CACHE_DIR``). ``--tune-db PATH`` points at any folder, e.g. one checked into a repo.

:class:`Tuner` is the hook :func:`slimc.backends.tvm.build.build_library` runs right after
operator fusion, before slimc's default schedules:

1. with a trial budget, it tunes the top-K fused kernels by FLOPs (times their call count) with
   MetaSchedule, within the budget and the optional time cap, writing records to the database.
   slimc's own schedule of each of these kernels is measured first and recorded like a trial
   (its schedule trace replays), so the database's best record is never slower than the
   default (up to timing noise) and the search starts from it;
2. it applies the database (``MetaScheduleApplyDatabase``) to every kernel whose best record
   for this target is a MetaSchedule schedule. Those kernels are marked scheduled, so slimc's
   rules skip them and schedule everything else as usual -- including the kernels where slimc's
   recorded schedule won, which then also get their weights packed at build time.

Two costs of stock MetaSchedule are avoided: ``TuneContext`` and the default builder import
``tvm.s_tir.tensor_intrin``, mostly CUDA TVMScript (~40 s per process on a loaded 2-core
host), which an LLVM target never uses; candidates are compiled in this process (no builder
pool to start per batch of trials) and measured in one ``LocalRunner`` worker, so generated
code runs out of process.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimc import interrupts
from slimc.errors import UsageError

log = logging.getLogger("slimc.tuning")

DB_FILES = ("database_workload.json", "database_tuning_record.json")
#: Kernels tuned by default: the most expensive ones carry nearly all of a model's FLOPs.
DEFAULT_TOP_K = 8


@dataclass
class TuningOptions:
    #: Total MetaSchedule trials (measured candidates); 0 only applies existing records.
    trials: int = 0
    #: Stop tuning after this many minutes even if trials remain.
    minutes: float | None = None
    #: Database folder; None means the per-target default under the slimc cache.
    database: str | Path | None = None
    top_k: int = DEFAULT_TOP_K

    def validate(self) -> None:
        """Raise :class:`UsageError` for values that cannot work (before any model is loaded)."""
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 0:
            raise UsageError(f"--tune {self.trials!r} is not a trial count.",
                             hint="Use --tune N with N >= 1 (e.g. --tune 200), or leave it out.")
        if self.minutes is not None:
            if not (isinstance(self.minutes, (int, float)) and math.isfinite(self.minutes)
                    and self.minutes > 0):
                raise UsageError(f"--tune-minutes {self.minutes!r} is not a positive duration.",
                                 hint="E.g. --tune 2000 --tune-minutes 15.")
            if not self.trials:
                raise UsageError("--tune-minutes caps tuning time, but no tuning was requested.",
                                 hint="Add --tune N (the trial budget), e.g. --tune 2000.")
        if self.top_k < 1:
            raise UsageError(f"top_k {self.top_k} must be >= 1.")
        if self.database is not None:
            check_database_dir(Path(self.database), writable=self.trials > 0)


def cache_root() -> Path:
    return Path(os.environ.get("SLIMC_CACHE_DIR") or Path.home() / ".cache" / "slimc")


def target_key(target) -> str:
    """What tuning records are matched on: the target without its host and core count.

    MetaSchedule needs ``num-cores`` on the target it tunes for (slimc sets it to the thread
    count), but records stay valid at other thread counts, so it is not part of the key.
    """
    exported = {k: v for k, v in target.export().items() if k not in ("host", "num-cores")}
    return json.dumps(exported, sort_keys=True, default=_jsonable)


def _jsonable(value: Any) -> Any:
    """``json.dumps`` fallback for TVM containers (``Array``) and anything else odd."""
    return list(value) if hasattr(value, "__iter__") else str(value)


def tuning_target(target, threads: int):
    """``target`` with the ``num-cores`` MetaSchedule requires."""
    import tvm

    exported = {k: v for k, v in target.export().items() if k != "host"}
    return tvm.target.Target({**exported, "num-cores": threads})


def default_database_dir(target) -> Path:
    digest = hashlib.sha256(target_key(target).encode()).hexdigest()[:16]
    return cache_root() / "tuning" / digest


def has_records(path: Path) -> bool:
    record_file = path / DB_FILES[1]
    return record_file.is_file() and record_file.stat().st_size > 0


def check_database_dir(path: Path, writable: bool) -> None:
    """A usable database folder: readable JSON lines; creatable/writable when tuning into it."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--tune-db {path} is a file, not a tuning database folder.",
                         hint="Point --tune-db at a folder (it holds database_workload.json and "
                         "database_tuning_record.json).")
    if not path.exists():
        if not writable:
            raise UsageError(f"--tune-db {path} does not exist.",
                             hint="Tune into it first (--tune N --tune-db PATH), or fix the path.")
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise UsageError(f"Cannot create the tuning database folder {path}: "
                             f"{exc.strerror or exc}.") from None
        return
    if not os.access(path, os.R_OK | os.X_OK) or (writable and not os.access(path, os.W_OK)):
        raise UsageError(f"--tune-db {path} is not {'writable' if writable else 'readable'}.",
                         hint="Fix its permissions or choose another folder.")
    workloads = 0
    for name in DB_FILES:
        file = path / name
        if not file.exists():
            continue
        where = ""
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines, 1):
                where = f" (line {number})"
                if not line.strip():
                    continue
                value = json.loads(line)
                if name == DB_FILES[0]:
                    workloads += 1
                elif not (isinstance(value, list) and len(value) == 2
                          and isinstance(value[0], int) and 0 <= value[0] < workloads):
                    raise ValueError(f"not a record of one of the {workloads} workloads in "
                                     f"{DB_FILES[0]}")
        except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSON errors included
            raise UsageError(f"--tune-db {path}: cannot read {name}{where}: {exc}.",
                             hint="Restore the folder from version control, or delete it and "
                             "tune again.") from None


def open_tuner(options: TuningOptions, target,
               progress: Callable[[str], None] = lambda message: None) -> Tuner | None:
    """The tuning hook for one build, or None when there is nothing to tune or apply."""
    path = Path(options.database) if options.database is not None else \
        default_database_dir(target)
    if options.trials <= 0 and not has_records(path):
        return None
    if options.database is None and has_records(path):
        check_database_dir(path, writable=options.trials > 0)  # the cache could be damaged too
    return Tuner(options, target, path, progress)


class Tuner:
    """Tunes (with a trial budget) and applies a database inside the build's Relax pipeline."""

    def __init__(self, options: TuningOptions, target, path: Path,
                 progress: Callable[[str], None] = lambda message: None) -> None:
        self.options = options
        self.target = target
        self.path = path
        self.progress = progress
        self.report: dict[str, Any] = {
            "database": str(path), "trials_requested": options.trials, "trials": 0,
            "minutes_cap": options.minutes, "tuned_kernels": [], "records_written": 0,
            "kernels": 0, "records_applied": 0, "applied_kernels": [],
            "records_for_other_targets": 0, "baselines": 0, "slimc_schedule_won": 0,
            "tune_s": 0.0,
            "stopped_by": None}

    def passes(self) -> list:
        """Module passes for the slot after fusion, before slimc's schedules."""
        import tvm

        return [tvm.transform.module_pass(self._run, opt_level=0, name="SlimcTuneAndApply")]

    def _run(self, mod, _ctx):
        if self.options.trials > 0:
            self.path.mkdir(parents=True, exist_ok=True)
            self._tune(mod)
        return self._apply(mod)

    # -- apply -----------------------------------------------------------------------------

    def _apply(self, mod):
        from tvm import relax, tirx

        pending = {gv.name_hint for gv, f in mod.functions_items()
                   if isinstance(f, tirx.PrimFunc) and not f.attrs.get("tirx.is_scheduled")}
        self.report["kernels"] = len(pending)
        database = self._database_for_target()
        if database is None or not pending:
            return mod
        with self.target, database:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        applied = sorted(gv.name_hint for gv, f in mod.functions_items()
                         if gv.name_hint in pending and f.attrs.get("tirx.is_scheduled"))
        self.report["records_applied"] = len(applied)
        self.report["applied_kernels"] = applied
        log.debug("applied tuning records to %s", applied)
        return mod

    def _database_for_target(self):
        """This target's records from the folder, as an in-memory database (None if none)."""
        if not has_records(self.path):
            return None
        from tvm.s_tir import meta_schedule as ms
        from tvm_ffi import structural_hash

        source = ms.database.JSONDatabase(work_dir=str(self.path), allow_missing=False)
        key = target_key(self.target)
        by_workload: dict = {}
        for record in source.get_all_tuning_records():
            if record.target is None or target_key(record.target) != key:
                self.report["records_for_other_targets"] += 1
                continue
            by_workload.setdefault(structural_hash(record.workload.mod), []).append(record)
        memory = ms.database.MemoryDatabase()
        count = 0
        for records in by_workload.values():
            best = min(records, key=_mean_run_secs)
            if _is_slimc_schedule(best):
                # slimc's own schedule won: leave the kernel to slimc's rules, which also pack
                # its weights (the recorded baseline replays on the unpacked workload).
                self.report["slimc_schedule_won"] += 1
                continue
            workload = memory.commit_workload(best.workload.mod)
            for record in records:
                memory.commit_tuning_record(ms.database.TuningRecord(
                    record.trace, workload, record.run_secs, record.target, record.args_info))
                count += 1
        return memory if count else None

    # -- tune ------------------------------------------------------------------------------

    def _tune(self, mod) -> None:
        from tvm.s_tir import meta_schedule as ms

        start = time.perf_counter()
        tasks = self._select_tasks(mod)
        if not tasks:
            self.report["stopped_by"] = "no tunable kernels"
            return
        self.report["tuned_kernels"] = [{"name": t.task_name, "calls": int(t.weight),
                                         "gflops": round(flops * 1e-9, 4)}
                                        for t, flops in tasks]
        threads = max(1, int(os.environ.get("TVM_NUM_THREADS") or 1))
        target = tuning_target(self.target, threads)
        budget = self.options.trials
        per_iter = max(4, min(64, budget // len(tasks)))
        database = ms.database.JSONDatabase(work_dir=str(self.path))
        before = len(database)
        deadline = (start + self.options.minutes * 60) if self.options.minutes else None
        callback = _progress_callback(self, len(tasks), budget, deadline)
        self.progress(f"tuning {len(tasks)} kernels: 0/{budget} trials")
        with tempfile.TemporaryDirectory(prefix="slimc-tune-") as work_dir, \
                _meta_schedule_logs(work_dir), _without_gpu_intrinsics():
            contexts = [ms.TuneContext(
                mod=task.dispatched[0], target=target, task_name=task.task_name,
                space_generator="post-order-apply",
                search_strategy=ms.search_strategy.EvolutionarySearch(
                    population_size=min(512, max(32, 4 * budget // len(tasks)))),
                logger=logging.getLogger(f"tvm.s_tir.meta_schedule.slimc.task_{i}"),
                rand_state=i + 1, num_threads=threads).clone()
                for i, (task, _) in enumerate(tasks)]
            runner = ms.runner.LocalRunner(
                timeout_sec=60,
                # Close to TVM's defaults. Flushing the cache per call (number=1, repeat=5)
                # was tried on MiniLM: no better end to end, and noisier on small kernels.
                evaluator_config=ms.runner.EvaluatorConfig(
                    number=3, repeat=1, min_repeat_ms=40, enable_cpu_cache_flush=False))
            self._commit_baselines(tasks, target, runner, database)
            try:
                ms.tune_tasks(
                    tasks=contexts, task_weights=[float(t.weight) for t, _ in tasks],
                    work_dir=work_dir, max_trials_global=budget, max_trials_per_task=budget,
                    num_trials_per_iter=per_iter, builder=_in_process_builder(), runner=runner,
                    database=database, cost_model=_cost_model(threads),
                    measure_callbacks=[*ms.MeasureCallback.create("default"), callback],
                    task_scheduler="gradient")
            except Exception:
                interrupts.check()  # a swallowed Ctrl-C/SIGTERM stops here
                if self.report["stopped_by"] != "time cap":  # _TimeCap, maybe re-wrapped by FFI
                    raise
        self.report["records_written"] = len(database) - before
        self.report["tune_s"] = round(time.perf_counter() - start, 2)
        self.report["stopped_by"] = self.report["stopped_by"] or "trial budget"

    def _commit_baselines(self, tasks, target, runner, database) -> None:
        """Measure slimc's default schedule of each task and record it like a trial.

        The database then picks whichever is faster, slimc's rule or a tuned schedule, so
        applying records never trades a kernel for a slower one (up to timing noise), and the
        evolutionary search starts from the hand schedule.
        """
        from slimc.backends.tvm.schedules import DEFAULT_RULES
        from slimc.backends.tvm.schedules.cpu_matmul import CONSTANT_OPERANDS
        from tvm.s_tir import meta_schedule as ms

        for task, _ in tasks:
            workload_mod = task.dispatched[0]
            func = workload_mod["main"]
            # Unpacked weights: MetaSchedule measures and replays kernels with the signature of
            # the workload, so the baseline must not rewrite a parameter's layout.
            func = func.without_attr(CONSTANT_OPERANDS) if func.attrs is not None \
                and CONSTANT_OPERANDS in func.attrs else func
            sch = None
            for rule in DEFAULT_RULES:
                try:
                    sch = rule.apply(func, self.target)
                except Exception as exc:  # noqa: BLE001 - the next rule, as in slimc's pipeline
                    interrupts.check()  # a swallowed Ctrl-C/SIGTERM stops here
                    log.debug("rule %s on %s: %s", rule.name, task.task_name, exc)
                    continue
                if sch is not None:
                    break
            if sch is None:
                continue
            try:
                artifact = _export(build_kernel(sch.mod, target))
                args_info = ms.arg_info.ArgInfo.from_prim_func(func)
                (future,) = runner.run([ms.runner.RunnerInput(artifact, "cpu", args_info)])
                result = future.result()
                if result.error_msg or not result.run_secs:
                    log.debug("baseline of %s failed to run: %s", task.task_name,
                              result.error_msg)
                    continue
                workload = database.commit_workload(workload_mod)
                database.commit_tuning_record(ms.database.TuningRecord(
                    sch.trace, workload, result.run_secs, target, args_info))
                self.report["baselines"] += 1
            except Exception as exc:  # noqa: BLE001 - tuning still works without a baseline
                interrupts.check()  # a swallowed Ctrl-C/SIGTERM stops here
                log.debug("no baseline for %s: %s", task.task_name, exc)

    def _select_tasks(self, mod) -> list[tuple[Any, float]]:
        """The top-K tasks by total FLOPs (per-call FLOPs times call count)."""
        from tvm.s_tir import meta_schedule as ms
        from tvm.s_tir.analysis import estimate_tir_flops

        scored = []
        for task in ms.relax_integration.extract_tasks(mod, self.target):
            if not task.dispatched or task.dispatched[0]["main"].attrs.get("tirx.is_scheduled"):
                continue
            try:
                flops = float(estimate_tir_flops(task.dispatched[0])) * float(task.weight)
            except Exception:  # noqa: BLE001 - dynamic shapes etc.: not worth tuning blind
                interrupts.check()  # a swallowed Ctrl-C/SIGTERM stops here
                continue
            if flops > 0:
                scored.append((task, flops))
        scored.sort(key=lambda item: -item[1])
        return scored[:self.options.top_k]


class _TimeCap(Exception):
    """Raised from the measure callback to end tuning at ``--tune-minutes``."""


def _progress_callback(tuner: Tuner, n_tasks: int, budget: int, deadline: float | None):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results) -> None:
            tuner.report["trials"] += len(runner_results)
            done = tuner.report["trials"]
            name = tuner.report["tuned_kernels"][task_id]["name"]
            tuner.progress(f"tuning {n_tasks} kernels: {done}/{budget} trials ({name})")
            if deadline is not None and time.perf_counter() > deadline:
                # The task scheduler has no clean stop; this batch's records are already
                # committed (AddToDatabase runs first), so unwinding loses nothing.
                tuner.report["stopped_by"] = "time cap"
                raise _TimeCap

    return Progress()


def _in_process_builder():
    """A builder that compiles candidates here: no worker pool, no CUDA intrinsics import."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_export

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    results.append(BuilderResult(default_export(build_kernel(item.mod,
                                                                             item.target)), None))
                except Exception as exc:  # noqa: BLE001 - a bad candidate, not a bad build
                    interrupts.check()  # a swallowed Ctrl-C/SIGTERM stops here
                    results.append(BuilderResult(None, f"{type(exc).__name__}: {exc}"))
            return results

    return InProcessBuilder()


def _mean_run_secs(record) -> float:
    secs = [float(x) for x in record.run_secs] if record.run_secs else []
    return sum(secs) / len(secs) if secs else math.inf


def _is_slimc_schedule(record) -> bool:
    """Whether a record is slimc's own schedule (a baseline): its trace samples nothing.

    MetaSchedule's search spaces always sample (tile sizes, unroll factors); slimc's rules are
    deterministic. MetaSchedule also re-measures the baseline trace as a candidate, so more than
    one record per kernel may be slimc's.
    """
    return not any(inst.kind.name.startswith("Sample") for inst in record.trace.insts)


def _export(rt_mod) -> str:
    from tvm.s_tir.meta_schedule.builder.local_builder import default_export

    return default_export(rt_mod)


def build_kernel(mod, target):
    """MetaSchedule's ``default_build`` without the ``tvm.s_tir.tensor_intrin`` import."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _cost_model(threads: int):
    """XGBoost when installed (better guided search), else random (still measures)."""
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return "random"
    from tvm.s_tir.meta_schedule.cost_model import XGBModel

    return XGBModel(num_tuning_cores=threads)


@contextmanager
def _without_gpu_intrinsics() -> Iterator[None]:
    """Make ``import tvm.s_tir.tensor_intrin`` cheap while tuning for a CPU.

    The package ``__init__`` parses every GPU intrinsic's TVMScript (tens of seconds); LLVM
    schedule rules use none of them. An empty package with the real ``__path__`` stands in
    with only the CPU intrinsics (``x86``, ``arm_cpu``) imported, and is removed afterwards.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    import tvm.s_tir as s_tir

    stub = types.ModuleType(name)
    stub.__path__ = [str(Path(s_tir.__file__).parent / "tensor_intrin")]
    sys.modules[name] = stub
    try:
        # The CPU schedule rules look these up (e.g. DefaultX86 wants dot_16x4_vnni).
        for cpu in ("x86", "arm_cpu"):
            importlib.import_module(f"{name}.{cpu}")
        yield
    finally:
        if sys.modules.get(name) is stub:
            # Submodules imported meanwhile stay: the real package reuses them.
            del sys.modules[name]
            if getattr(s_tir, "tensor_intrin", None) is stub:
                delattr(s_tir, "tensor_intrin")


@contextmanager
def _meta_schedule_logs(work_dir: str) -> Iterator[None]:
    """Send MetaSchedule's (chatty) logs to a file in ``work_dir``, not the console."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    handler = logging.FileHandler(os.path.join(work_dir, "tuning.log"))
    saved = (logger.level, logger.propagate, list(logger.handlers))
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers = saved[2]
