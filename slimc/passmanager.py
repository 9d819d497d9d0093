"""Passes and the pass manager, after LLVM's new pass manager.

* A pass is a class with a kebab-case ``name``, a docstring, an ``Options`` pydantic model and a
  ``run`` method. :class:`AnalysisPass` returns a result the :class:`AnalysisManager` caches;
  :class:`TransformPass` edits the IR in place and returns :class:`PreservedAnalyses`.
* Passes never compute analyses themselves: they ask ``ctx.analyses.get("name")``. The manager
  computes lazily, caches by (analysis, options, IR version), and after each transform drops
  every result the transform did not preserve (a preserved result is re-keyed to the new
  version). A search that tries candidates clones the IR and gives each clone its own manager
  (:meth:`AnalysisManager.for_clone`); nothing is cached at module level.
* Every transform is checked numerically against the IR it was given (``PassContext.verify``):
  one that declares itself ``exact`` must reproduce the outputs within tolerance, and every
  transform's fidelity change is recorded for the manifest.
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from slimc import symbols
from slimc.errors import PluginFailure, SlimcError, VerificationError
from slimc.ir import IR
from slimc.memory import return_freed_memory


class PassOptions(BaseModel):
    """Base class of every pass's options: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(PassOptions):
    pass


class Pass:
    """Common interface of analyses and transforms."""

    #: Unique, kebab-case, says what the pass does (``eliminate-dead-code``).
    name: ClassVar[str] = ""
    #: "analysis" or "transform".
    kind: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = NoOptions

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


class AnalysisPass(Pass):
    """Computes facts about the IR without changing it; results are cached by the manager."""

    kind = "analysis"

    def run(self, ir: IR, ctx: PassContext, options: PassOptions) -> Any:
        raise NotImplementedError


class TransformPass(Pass):
    """Rewrites the IR in place and returns which cached analyses are still valid."""

    kind = "transform"
    #: True when the transform must not change the model's outputs (beyond float noise).
    exact: ClassVar[bool] = False
    #: True when the transform learns from the model as it was before the pipeline (e.g.
    #: ``distill``): the pass manager then keeps a clone of it in ``PassContext.original``.
    needs_original: ClassVar[bool] = False

    def run(self, ir: IR, ctx: PassContext, options: PassOptions) -> PreservedAnalyses:
        raise NotImplementedError


@dataclass(frozen=True)
class PreservedAnalyses:
    """Which analyses a transform kept valid (LLVM's ``PreservedAnalyses``)."""

    names: frozenset[str] = frozenset()
    everything: bool = False

    @classmethod
    def all(cls) -> PreservedAnalyses:
        return cls(everything=True)

    @classmethod
    def none(cls) -> PreservedAnalyses:
        return cls()

    @classmethod
    def only(cls, *names: str) -> PreservedAnalyses:
        return cls(frozenset(names))

    def preserves(self, name: str) -> bool:
        return self.everything or name in self.names


class AnalysisManager:
    """Lazily computes and caches analysis results for one IR."""

    def __init__(self, ir: IR, ctx: PassContext, lookup: Callable[[str], type[Pass]]) -> None:
        self._ir = ir
        self._ctx = ctx
        self._lookup = lookup
        #: (analysis name, options JSON, IR version) -> result.
        self._cache: dict[tuple[str, str, int], Any] = {}
        #: (analysis name, computed?) log, for tests and ``--verbose``.
        self.history: list[tuple[str, bool]] = []

    @property
    def ir(self) -> IR:
        return self._ir

    def get(self, name: str, **options: Any) -> Any:
        """The result of analysis ``name`` with ``options`` on the IR as it is now (its
        ``version``), computed once until invalidated."""
        cls = self._lookup(name)
        if cls.kind != "analysis":
            raise TypeError(f"{name} is a {cls.kind}, not an analysis")
        opts = cls.Options(**options)
        key = (name, json.dumps(opts.model_dump(mode="json"), sort_keys=True), self._ir.version)
        if key in self._cache:
            self.history.append((name, False))
            return self._cache[key]
        # An analysis a transform asks for is checked here too (an undone pinning, not the
        # transform's internal error).
        with keeps_dynamic_dims(self._ir, name, undo=True):
            result = cls().run(self._ir, self._ctx, opts)
        self._cache[key] = result
        self.history.append((name, True))
        return result

    def cached(self, name: str) -> bool:
        return any(k[0] == name and k[2] == self._ir.version for k in self._cache)

    def invalidate(self, preserved: PreservedAnalyses) -> list[str]:
        """Drop results not in ``preserved``; the preserved ones are re-keyed to the IR's
        current version (the transform vouched for them). Returns the names dropped."""
        dropped = sorted({k[0] for k in self._cache if not preserved.preserves(k[0])})
        self._cache = {(k[0], k[1], self._ir.version): v for k, v in self._cache.items()
                       if preserved.preserves(k[0])}
        return dropped

    def for_clone(self, ir: IR, ctx: PassContext | None = None) -> AnalysisManager:
        """A fresh manager for a clone of this IR (a search candidate): nothing is shared, so
        a candidate's edits can never leak results into this IR's cache or the other way."""
        return AnalysisManager(ir, ctx or self._ctx, self._lookup)


@dataclass
class PassContext:
    """What travels with a compilation (TVM's ``PassContext``): target, data, settings."""

    target: Any = None
    #: Example inputs, in IR input order: what transforms are verified on.
    example_inputs: list[torch.Tensor] = field(default_factory=list)
    #: Calibration batches (each in IR input order) from ``--calib``; may be empty.
    calibration_batches: list[list[torch.Tensor]] = field(default_factory=list)
    threads: int | None = None
    #: Relative L2 error an ``exact`` transform may introduce.
    exact_tolerance: float = 1e-4
    verify: bool = True
    analyses: AnalysisManager | None = None
    log: Callable[[str], None] = lambda message: None
    #: Per-compilation memo for passes (e.g. measured quantization damage keyed by weight
    #: fingerprint): lives and dies with this context, never in a module-level dict.
    memo: dict[str, Any] = field(default_factory=dict)
    #: The last outputs of an IR on ``example_inputs`` and the (IR, version) they belong to:
    #: the compiler's reference run, the pass manager's before/after checks and the compiler's
    #: post-pipeline run share it instead of each running the same graph again. The IR is held
    #: by a weak reference: a cache must not keep a model's weights alive (a search's contexts
    #: are copies of this one, so a strong reference kept the original IR, a full copy of the
    #: weights, alive through the chosen candidate's build).
    example_outputs: tuple[Any, int, list[torch.Tensor]] | None = None
    #: The IR as it was before the pipeline's first pass (the teacher of ``distill``); only
    #: kept while a pass that declares ``needs_original`` is still to run (a model's worth of
    #: memory).
    original: IR | None = None
    #: ``load_data(path, max_batches)``: other data read like ``--calib`` into batches of the
    #: calibration's shape (IR input order), for a pass given its own data file (``distill
    #: {data=...}``: training text apart from the calibration text that fixed the codes).
    #: Set by the compiler; None outside it.
    load_data: Callable[[str, int], list[list[torch.Tensor]]] | None = None

    def outputs_on_examples(self, ir: IR) -> list[torch.Tensor]:
        """``ir.run(example_inputs)``, run again only when the IR changed since the last run
        (:meth:`IR.changed` bumps its version; a transform's edits always end with it)."""
        cached = self.example_outputs
        if cached is not None and cached[0]() is ir and cached[1] == ir.version:
            return cached[2]
        outputs = ir.run(self.example_inputs)
        self.example_outputs = (weakref.ref(ir), ir.version, outputs)
        return outputs

    def calibration(self, max_batches: int | None = None) -> list[list[torch.Tensor]]:
        """Calibration batches when the user gave data, else the example inputs as one batch.

        Every pass that needs activations (activation-aware criteria, GPTQ/AWQ, pruning
        reconstruction) reads its data here, so ``--calib`` reaches all of them.
        """
        batches = [list(b) for b in self.calibration_batches] or [list(self.example_inputs)]
        return batches[:max_batches] if max_batches else batches


@dataclass(frozen=True)
class PassInvocation:
    """One element of a pipeline: a pass name and its (validated) options."""

    name: str
    options: PassOptions

    def to_json(self) -> dict[str, Any]:
        return {"pass": self.name, "options": self.options.model_dump(mode="json")}

    def __str__(self) -> str:
        opts = self.options.model_dump(mode="json")
        if not opts:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in opts.items()) + "}"


@dataclass
class PassRecord:
    """What running one pass did, for the manifest and report."""

    invocation: PassInvocation
    kind: str
    seconds: float
    params_before: int
    params_after: int
    invalidated: list[str] = field(default_factory=list)
    fidelity: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**self.invocation.to_json(), "kind": self.kind,
                "seconds": round(self.seconds, 3), "params_before": self.params_before,
                "params_after": self.params_after, "invalidated": self.invalidated,
                "fidelity": self.fidelity}


def relative_l2(reference: Iterable[torch.Tensor], candidate: Iterable[torch.Tensor]) -> float:
    """Largest relative L2 error over outputs (0 for identical, exact for integer outputs)."""
    worst = 0.0
    for ref, out in zip(reference, candidate, strict=True):
        if ref.shape != out.shape:
            return float("inf")
        ref64, out64 = ref.double(), out.double()
        denom = max(float(ref64.norm()), 1e-12)
        worst = max(worst, float((ref64 - out64).norm()) / denom)
    return worst


class PassManager:
    """Runs a pipeline of pass invocations over one IR."""

    def __init__(self, passes: dict[str, type[Pass]],
                 plugin_of: Callable[[str], str] | None = None) -> None:
        self._passes = passes
        #: pass name -> the plugin that registered it, to name a misbehaving third-party pass.
        self._plugin_of = plugin_of

    def lookup(self, name: str) -> type[Pass]:
        return self._passes[name]

    def run(self, ir: IR, pipeline: list[PassInvocation], ctx: PassContext,
            on_pass: Callable[[PassInvocation], None] | None = None) -> list[PassRecord]:
        am = ctx.analyses or AnalysisManager(ir, ctx, self.lookup)
        ctx.analyses = am
        records: list[PassRecord] = []
        needing = [i for i, inv in enumerate(pipeline)
                   if getattr(self.lookup(inv.name), "needs_original", False)]
        own_original = bool(needing) and ctx.original is None
        if own_original:
            ctx.original = ir.clone()
        for position, inv in enumerate(pipeline):
            if own_original and position > needing[-1]:
                ctx.original = own_original = None  # nothing left needs it: let it go
            if on_pass:
                on_pass(inv)
            cls = self.lookup(inv.name)
            params_before = ir.num_params()
            start = time.perf_counter()
            record = PassRecord(inv, cls.kind, 0.0, params_before, params_before)
            if cls.kind == "analysis":
                with self._blame(inv.name):
                    result = am.get(inv.name, **inv.options.model_dump())
                ir.annotations.setdefault("analyses", {})[inv.name] = _summarise(result)
            else:
                reference = ctx.outputs_on_examples(ir) if ctx.verify else None
                with self._blame(inv.name), keeps_dynamic_dims(ir, inv.name, undo=False):
                    preserved = cls().run(ir, ctx, inv.options)
                    if not isinstance(preserved, PreservedAnalyses):
                        raise TypeError(f"transform {inv.name} must return PreservedAnalyses, "
                                        f"not {type(preserved).__name__}")
                ir.changed()
                record.invalidated = am.invalidate(preserved)
                # The weights the pass replaced and its temporaries (in each worker thread's
                # malloc arena) go back to the OS before the check's forward allocates more
                # (issue 18: quantize{weights=int4} on SmolLM2 left ~0.6 GB in the heap).
                return_freed_memory()
                if reference is not None:
                    record.fidelity = _verify_transform(ir, ctx, inv, cls, reference)
            record.seconds = time.perf_counter() - start
            record.params_after = ir.num_params()
            records.append(record)
            ctx.log(f"{inv}: {record.seconds:.2f}s, params {params_before:,} -> "
                    f"{record.params_after:,}")
        if own_original:
            ctx.original = None
        return records


    @contextmanager
    def _blame(self, name: str) -> Iterator[None]:
        """A third-party pass that raises (anything but a UsageError, its way of blaming the
        user) is reported naming its plugin; a built-in's failure stays an internal error."""
        try:
            yield
        except SlimcError:
            raise
        except Exception as exc:
            plugin = self._plugin_of(name) if self._plugin_of else None
            if plugin is None or plugin == "?" or _is_builtin(plugin):
                raise
            raise PluginFailure(
                f"Pass {name!r} from plugin {plugin!r} failed: {type(exc).__name__}: {exc}",
                hint=f"This is a bug in the plugin {plugin!r}; report it to its authors, or "
                "leave the pass out (`--plugins`/`--no-plugins`, $SLIMC_NO_PLUGINS disable "
                "plugins).") from exc


class DynamicDimsLost(RuntimeError):
    """A pass pinned a symbolic input dim of a dynamic IR to a number (an internal error)."""


@contextmanager
def keeps_dynamic_dims(ir: IR, name: str, undo: bool) -> Iterator[None]:
    """Check that pass ``name`` left every symbolic input dim of ``ir`` symbolic (see
    :mod:`slimc.symbols`): an analysis's pinning is undone (``undo``; its results were computed
    at the example size, which is what analyses report), a transform's raises, because the
    graph it rewrote may hold the example size where a symbol was."""
    snap = symbols.snapshot(ir)
    yield
    if snap is None:
        return
    lost = symbols.pinned(ir, snap)
    if not lost:
        return
    symbols.restore(snap)
    if undo and not symbols.pinned(ir, snap):
        return
    raise DynamicDimsLost(
        f"pass {name!r} pinned the dynamic input dim(s) {', '.join(lost)} to the example size "
        "(an int()/numel()/comparison on a symbolic meta['val'] size; read sizes with "
        "slimc.ir.hinted_shape instead)")


def _is_builtin(plugin: str) -> bool:
    from slimc.plugins import BUILTIN_PLUGINS

    return plugin in BUILTIN_PLUGINS


def _verify_transform(ir: IR, ctx: PassContext, inv: PassInvocation, cls: type[Pass],
                      reference: list[torch.Tensor]) -> dict[str, float]:
    try:
        ctx.example_outputs = None  # the transform ran: its outputs are new by definition
        outputs = ctx.outputs_on_examples(ir)
    except Exception as exc:  # noqa: BLE001 - a transform that breaks execution is a bug
        raise VerificationError(
            f"After pass {inv}, the IR no longer runs: {type(exc).__name__}: {exc}",
            hint="This is a bug in that pass; run without it and report the model.",
        ) from exc
    err = relative_l2(reference, outputs)
    if getattr(cls, "exact", False) and not err <= ctx.exact_tolerance:
        raise VerificationError(
            f"Pass {inv} must preserve the model's outputs but changed them by a relative L2 "
            f"error of {err:.3g} (tolerance {ctx.exact_tolerance:g}).",
            hint="This is a bug in that pass; run without it and report the model.",
        )
    return {"relative_l2_vs_previous": err}


def _summarise(result: Any) -> Any:
    """A JSON-safe view of an analysis result for the IR's annotations."""
    if hasattr(result, "to_json"):
        return result.to_json()
    try:
        json.dumps(result)
        return result
    except TypeError:
        return repr(result)
