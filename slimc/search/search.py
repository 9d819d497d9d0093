"""The budget search: solve per-layer choices, build the candidate, measure it, back off.

For each structured-pruning ratio the techniques allow, the IR is pruned (a clone) and every
remaining layer's choices are costed and their damage measured (:mod:`.space`). The solver
(:mod:`.solver`) picks one choice per layer minimising the summed single-layer damage under the
budgets. The pick is then *built* (a clone of the IR through the real ``prune`` / ``lowrank`` /
``quantize`` passes, exactly the recipe that reproduces it) and *measured*: weight bytes and
parameters of the built IR, the cost model's latency of the built IR, and the task metric (or
the proxy). Damage is not additive across layers; when the measured drop exceeds
``--max-drop``, the most damaging choices (largest measured single-layer damage) are excluded
and the solver re-run under the same budget, until both hold or nothing fits. Without a budget
(``-O2``/``-O3``/``-Os``) the smallest budget on the level's objective whose measured candidate
stays within ``--max-drop`` wins; its probes go where the damage table's predicted drop,
calibrated by each candidate measured, reaches ``--max-drop`` (:mod:`.probes`). See
docs/budget.md.
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from slimc.errors import UsageError
from slimc.ir import IR
from slimc.memory import return_freed_memory
from slimc.passes.analysis.criteria.divergence import divergence_from, output_kind
from slimc.passes.analysis.criteria.execution import calibration_batches
from slimc.passes.quantize.layers import takes_int8_activations
from slimc.passmanager import PassContext, PassManager, PassRecord
from slimc.pipeline import validate

from .budget import Budget
from .probes import PredictedCurve, Probe, next_budget
from .solver import Infeasible, solve
from .space import Space, Techniques, build_space, layer_patterns, option_costs

#: Most back-off rounds per pruning ratio (each builds and measures one candidate).
MAX_BACKOFFS = 6
#: Most candidates a budget-less (``-O2/-O3/-Os``) search builds per pruning ratio and family
#: (the bisection's steps; the predicted probes usually stop after 2-3, :mod:`.probes`).
BISECTION_STEPS = 5
#: How a budget-less search places its probes: ``"predicted"`` (the damage table's predicted
#: drop, calibrated by each measurement: :mod:`.probes`) or ``"bisect"`` (log midpoints).
PROBES = "predicted"
#: Largest MLP-channel-only pruning ratio :meth:`Search.w8a8_pruned_to` builds with W8A8
#: (the measured drop still decides; above it, channels and heads together are tried).
MLP_PRUNE_CAP = 0.5
#: Share under a latency budget that :meth:`Search.w8a8_pruned_to` aims its pruning ratio at
#: (acceptance is still the budget itself): the cost model's measured error on MiniLM's
#: artifacts was 1-8% (docs/benchmarks.md, issue 17), so a prune priced just under the budget
#: need not be faster on the target than the W8A8 it was added to.
PRUNE_LATENCY_MARGIN = 0.05
#: Most candidates :meth:`Search.refine` builds after the search (one per upgraded layer,
#: each kept only when it measures better). Why not one: the damage table's ranking of the
#: most damaged layers is itself an estimate (MiniLM's int4-g32-fz: layer 4's FFN input
#: first in one table, layer 5's value projection in another, and only the latter measured
#: better, docs/benchmarks.md session 28).
REFINE_STEPS = 3
#: Share of a latency budget :meth:`Search.refine` leaves unspent. Why: refining spends
#: the budget's slack on the cost model's word, up to its edge, and on MiniLM (32 x 8 tokens,
#: the Zen 5 host) the cost model under-predicted the W8A8 artifacts by 11-14%: uniform W8A8
#: priced 0.392 of fp32 measured 0.436, with two layers kept fp32 priced 0.432 measured
#: 0.491, with three priced 0.465 measured 0.530, over a 0.5 budget (docs/benchmarks.md,
#: session 28).
REFINE_LATENCY_MARGIN = 0.12
#: Prune group kinds that are attention heads (``passes/prune/prune.py``'s ``KINDS``).
HEAD_KINDS = frozenset({"attention-head", "kv-group", "query-head"})
#: Seconds of distillation (all tries together) the search may spend when no candidate meets
#: ``--max-drop`` (``--distill-budget``). Why 300: a bounded addition to a search that takes
#: minutes already, hundreds of steps for a small model; measured on MiniLM (32x8 tokens per
#: batch) a step took 2.4-3 s at load ~15 on the 2-core host, so 300 s bought 36-55 steps and
#: recovered a quarter of one candidate's loss (docs/benchmarks.md): raise it for more.
DISTILL_BUDGET_S = 300.0
#: How many of the closest candidates (lowest measured drop within the budget) get a try.
DISTILL_CANDIDATES = 2
#: Steps of the probe that measures one step's time; fewer steps than the minimum fit in the
#: budget -> distillation is not tried (a handful of steps recovers nothing worth a build).
DISTILL_PROBE_STEPS = 3
DISTILL_MIN_STEPS = 20
DISTILL_MAX_STEPS = 2000
#: At most this many passes over the training batches: measured on a tiny Llama with 12
#: training batches, 500 steps made the held-out loss worse than 150 (memorised), so the
#: budget buys steps only up to what the calibration data can teach.
DISTILL_MAX_EPOCHS = 20
#: Peak learning rate of the search's distillation (AdamW, warm-up then cosine decay).
DISTILL_LR = 1e-3


@dataclass
class Scorer:
    """How good a candidate IR is: the task metric (``--eval-data``) or a proxy."""

    kind: str  # "task" or "proxy"
    label: str
    original: float
    higher_is_better: bool
    score: Callable[[IR], float]
    #: The proxy's score given the candidate's context too: its outputs on the example
    #: inputs, cached by the pass manager's last verification, are not run again.
    score_in: Callable[[IR, PassContext], float] | None = None

    def evaluate(self, ir: IR, ctx: PassContext | None = None) -> float:
        """:attr:`score` of ``ir``, reusing what ``ctx`` has already run on it."""
        if ctx is not None and self.score_in is not None:
            return self.score_in(ir, ctx)
        return self.score(ir)

    def drop(self, value: float) -> float:
        """Loss as a share of the original value (the proxy's value *is* the loss)."""
        if self.kind == "proxy":
            return value
        if not self.original:
            return 0.0 if value == self.original else math.inf
        change = (value - self.original) / abs(self.original)
        return -change if self.higher_is_better else change


def _runner(ir: IR):
    return lambda arrays: [o.numpy() for o in ir.run(
        [torch.from_numpy(np.require(a, requirements="C")) for a in arrays])]


def task_scorer(task) -> Scorer:
    """The ``--eval-data`` metric (a prepared :class:`slimc.task_eval.TaskEvaluation`)."""
    original = task.values["original"]
    key = next(iter(original))
    return Scorer("task", task.label, original[key], task.higher_is_better,
                  lambda ir: float(task.run_one(_runner(ir))[key]))


def proxy_scorer(ir: IR, ctx: PassContext, max_batches: int = 4,
                 batches: Sequence[Sequence[torch.Tensor]] | None = None,
                 where: str = "calibration batch(es)") -> Scorer:
    """Without task data: the mean output divergence from the original on the calibration
    batches (the example input when there is no ``--calib``; ``batches`` when given, e.g.
    those distillation held out): 1 - cosine for embeddings, KL of the softmax for logits,
    relative L2 otherwise. ``--max-drop`` then bounds it."""
    batches = [list(b) for b in batches] if batches is not None \
        else calibration_batches(ir, ctx, max_batches)
    kinds = [output_kind(name) for name in ir.output_names]
    references = [[(ref, divergence_from(kind, ref) if ref.is_floating_point() else None)
                   for kind, ref in zip(kinds, _outputs(ir, ctx, b), strict=True)]
                  for b in batches]
    what = sorted({{"embedding": "1 - cosine", "logits": "KL divergence"}.get(k, "relative L2")
                   for k in kinds})
    label = (f"proxy: output {' / '.join(what)} vs the original (worst output) on "
             f"{len(batches)} {where}; no --eval-data")

    def score(candidate: IR, cctx: PassContext | None = None) -> float:
        worst = 0.0
        for refs, b in zip(references, batches, strict=True):
            outs = _outputs(candidate, cctx, b)
            for (ref, compare), out in zip(refs, outs, strict=True):
                if compare is not None and ref.shape == out.shape:
                    worst = max(worst, compare(out))
        return worst

    return Scorer("proxy", label, 0.0, False, score, score)


def _outputs(ir: IR, ctx: PassContext | None, batch: Sequence[torch.Tensor]
             ) -> list[torch.Tensor]:
    """``ir.run(batch)``; through ``ctx``'s example-output cache when ``batch`` is its
    example inputs (without ``--calib`` the proxy's only batch): a candidate's last
    verification already ran exactly that (issue 18: one forward of the model per candidate)."""
    examples = ctx.example_inputs if ctx is not None else []
    if examples and len(batch) == len(examples) and all(
            a is b for a, b in zip(batch, examples, strict=True)):
        return ctx.outputs_on_examples(ir)
    return ir.run(batch)


@dataclass(frozen=True)
class W8A8Recipe:
    """What :meth:`Search._build_w8a8` was given: the base's pruning ratio, the int8 picks,
    the pruning items before ``quantize`` and the layers kept fp32."""

    ratio: float
    picks: tuple[int, ...]
    prune: list[tuple[str, dict[str, Any]]]
    kept_float: tuple[str, ...] = ()


@dataclass
class Candidate:
    """One built and measured assignment."""

    prune_ratio: float
    items: list[tuple[str, dict[str, Any]]]
    #: Measured on the built IR, relative to the original: size, params, latency.
    relative: dict[str, float]
    value: float
    drop: float
    choices: dict[str, int]
    predicted_damage: float
    ir: IR | None = None
    records: list[PassRecord] = field(default_factory=list)
    ctx: PassContext | None = None
    backoffs: int = 0
    #: Set when the candidate was recovered by ``distill`` (steps, drop before and after).
    distill: dict[str, Any] | None = None
    #: The per-layer option indices that wrote its recipe (None: W8A8 or another pipeline
    #: than the picks', which :meth:`Search.refine` cannot step from).
    picks: tuple[int, ...] | None = None
    #: The format when the candidate is one format on every layer (:meth:`Search._uniform`).
    uniform: str | None = None
    #: How a W8A8 candidate was built (:meth:`Search.refine` rebuilds it with layers kept
    #: float) and each W8A8 layer's calibrated output error (the quantize pass's).
    w8a8: W8A8Recipe | None = None
    w8a8_errors: dict[str, float] | None = None

    def release(self) -> None:
        """Let go of the built IR (a full copy of the model's weights), its pass records and
        context, keeping the measurements. Why: a search builds many candidates and keeps only
        the best; each kept IR held a model's worth of memory until the search ended (issue 18:
        ``-O2`` peak memory on real LLMs)."""
        self.ir, self.records, self.ctx = None, [], None
        # an IR's graph is a web of reference cycles (nodes <-> graph <-> module): its weights
        # are freed by the garbage collector, not when the last name goes; then trimmed
        return_freed_memory()

    def summary(self) -> dict[str, Any]:
        return {"pipeline": pipeline_text(self.items), "prune_ratio": self.prune_ratio,
                "relative": {k: round(v, 5) for k, v in self.relative.items()},
                "value": self.value, "drop": self.drop, "choices": self.choices,
                "predicted_damage": self.predicted_damage, "backoffs": self.backoffs,
                **({"distill": self.distill} if self.distill else {})}


def pipeline_text(items: Sequence[tuple[str, dict[str, Any]]]) -> str:
    parts = []
    for name, opts in items:
        text = ",".join(f"{k}={v}" for k, v in opts.items() if "," not in str(v))
        long = {k: v for k, v in opts.items() if "," in str(v)}
        shown = text + ("," if text and long else "") + ",".join(
            f"{k}=<{len(str(v).split(','))} entries>" for k, v in long.items())
        parts.append(f"{name}{{{shown}}}" if opts else name)
    return ",".join(parts)


@dataclass
class _Base:
    ratio: float
    ir: IR
    records: list[PassRecord]
    space: Space


class Search:
    """Candidates for one model and target; see the module docstring."""

    def __init__(self, ir: IR, ctx: PassContext, registry, techniques: Techniques,
                 scorer: Scorer, hardware, log: Callable[[str], None] = lambda m: None,
                 damage_batches: int = 2, damage_method: str = "local") -> None:
        self.ir, self.ctx, self.registry = ir, ctx, registry
        self.techniques, self.scorer, self.hw, self.log = techniques, scorer, hardware, log
        self.damage_batches, self.damage_method = damage_batches, damage_method
        self.max_backoffs = MAX_BACKOFFS
        self.manager = PassManager(registry.passes)
        self.original = {"size": float(ir.weight_bytes()), "params": float(ir.num_params())}
        if hardware is not None:
            self.original["latency"] = self._latency(ctx)
        self._bases: dict[float, _Base] = {}
        self._costs_only: _Base | None = None
        self.measured: list[Candidate] = []
        #: What :meth:`lossless` found (exact layers per format, used or why not), for the
        #: manifest; None until it ran.
        self.exact: dict[str, Any] | None = None
        self.seconds: dict[str, float] = {"space": 0.0, "candidates": 0.0}

    # -- building blocks -------------------------------------------------------------------

    def _latency(self, ctx: PassContext) -> float:
        return float(ctx.analyses.get("cost").total.get("latency_s", 0.0))

    def _clone_ctx(self, ir: IR) -> PassContext:
        ctx = replace(self.ctx, analyses=None, log=lambda m: None)
        ctx.analyses = self.ctx.analyses.for_clone(ir, ctx)
        return ctx

    def _run(self, ir: IR, items: list[tuple[str, dict[str, Any]]],
             copy_of: IR | None = None) -> tuple[list[PassRecord], PassContext]:
        """``items`` on ``ir`` with a context of its own. ``copy_of``: the IR ``ir`` was
        cloned from, unchanged since: its outputs on the example inputs, when the compile's
        context holds them, are ``ir``'s too (the same graph and weights), so the pass
        manager's reference for the first pass is not run again for every candidate."""
        ctx = self._clone_ctx(ir)
        cached = self.ctx.example_outputs
        if copy_of is not None and cached is not None and cached[0]() is copy_of \
                and cached[1] == copy_of.version:
            ctx.example_outputs = (weakref.ref(ir), ir.version, cached[2])
        # ``distill``'s teacher is the model before *any* pass: a candidate is built on the
        # pruned base, so the pass manager's own copy would be the pruned model. The original
        # IR is only read (the teacher runs forwards), so it is lent, not cloned.
        ctx.original = self.ir
        records = self.manager.run(ir, validate(items, self.registry.passes), ctx)
        # Lent for the passes only: a kept candidate's context must not keep the original
        # model alive (the chosen one's is the compile's from here on: the fp32 weights beside
        # the compressed ones through lowering and build; issue 18).
        ctx.original = None
        return records, ctx

    def base(self, ratio: float) -> _Base:
        """The IR pruned by ``ratio`` (a clone) and its choice space, built once. Unpruned
        (ratio 0), the base *is* the original IR: measuring the space only reads it and every
        candidate is built on a clone, so a copy would only hold the weights twice."""
        if ratio not in self._bases:
            t0 = time.perf_counter()
            ir = self.ir.clone() if ratio else self.ir
            records, ctx = self._run(ir, [("prune", {"ratio": ratio})] if ratio else [])
            space = build_space(ir, ctx, self.techniques, self.hw, self.damage_batches,
                                self.damage_method)
            self._bases[ratio] = _Base(ratio, ir, records, space)
            self.seconds["space"] += time.perf_counter() - t0
            self.log(f"search: prune ratio {ratio:g}: {space.info['layers']} layers, "
                     f"{space.info['options']} choices measured")
        return self._bases[ratio]

    def cost_base(self) -> _Base:
        """The unpruned IR's choices with their costs and no damage table (seconds, not
        minutes; low rank left out: its spectra are the slow part), built once: what the
        refusals from the costs and the lossless candidate need."""
        if self._costs_only is None:
            _, ctx = self._run(self.ir, [])
            techniques = replace(self.techniques, lowrank_keeps=())
            space = build_space(self.ir, ctx, techniques, self.hw, measure_damage=False)
            self._costs_only = _Base(0.0, self.ir, [], space)
        return self._costs_only

    def any_space(self) -> Space | None:
        """A measured space (the unpruned one first), else the costs-only one, for the
        report's target costs; None when the search built none."""
        if self._bases:
            return self._bases.get(0.0, next(iter(self._bases.values()))).space
        return self._costs_only.space if self._costs_only is not None else None

    def items(self, base: _Base, picks: Sequence[int],
              techniques: Techniques | None = None) -> list[tuple[str, dict[str, Any]]]:
        """The recipe pipeline (after pruning) that builds ``picks``, rounding as
        ``techniques`` says (default: the search's own)."""
        techniques = techniques or self.techniques
        space = base.space
        chosen = [(c, c.options[j]) for c, j in zip(space.layers, picks, strict=True)]
        items: list[tuple[str, dict[str, Any]]] = []
        ranks = {c.layer.name: o.rank for c, o in chosen if o.rank}
        if ranks:
            items.append(("lowrank", {
                "method": self.techniques.lowrank_method,
                "ranks": ",".join(f"{n}={r}" for n, r in ranks.items()),
                "embeddings": any(c.layer.is_embedding for c, o in chosen if o.rank)}))
        formats = [o.fmt for _, o in chosen]
        quantized = [f for f in formats if f.kind != "fp32"]
        if quantized:
            default = Counter(quantized).most_common(1)[0][0]
            opts: dict[str, Any] = {"weights": default.kind}
            if default.coded_scales:  # a full name: its group and code width with it
                opts["weights"] = str(default)
            elif default.kind == "int4":
                opts["group_size"] = default.group_size
                opts["symmetric"] = default.symmetric
                if default.float_zero:
                    opts["zero_point"] = "float"
            elif default.lowbit:
                opts["group_size"] = default.group_size
            if techniques.quantize_method != "rtn":
                opts["method"] = techniques.quantize_method
                if techniques.quantize_method == "gptq" and techniques.act_order:
                    opts["act_order"] = True
            rules = [f"{p}={o.fmt}" for c, o in chosen if o.fmt != default
                     for p in layer_patterns(c.layer.name, bool(o.rank))]
            if rules:
                opts["layers"] = ",".join(rules)
            items.append(("quantize", opts))
        items.append(("eliminate-dead-code", {}))
        return items

    def build(self, base: _Base, picks: Sequence[int], keep: bool = False,
              rest: list[tuple[str, dict[str, Any]]] | None = None,
              choices: dict[str, int] | None = None) -> Candidate:
        """Build ``picks`` on a clone of the pruned IR and measure it. The clone shares the
        base's weight tensors (:meth:`IR.clone`): the recipe's passes replace the weights
        they compress, so a candidate costs only its new weights, not a copy of the model.
        ``rest`` / ``choices``: another pipeline than the one ``picks`` write (W8A8, whose
        int8 inputs are no per-layer choice), described by ``choices``; ``picks`` then give
        the predicted damage (of its weights)."""
        t0 = time.perf_counter()
        own = rest is None
        rest = self.items(base, picks) if rest is None else rest
        ir, records, ctx, relative = self._build_items(base, rest)
        value = self.scorer.evaluate(ir, ctx)
        per_layer = ir.annotations.get("quantize", {}).get("per_layer", {})
        errors = {name: float(e["calib_error"]) for name, e in per_layer.items()
                  if "calib_error" in e}
        space = base.space
        if choices is None:
            choices = Counter(str(space.layers[i].options[j]) for i, j in enumerate(picks))
        predicted = float(sum(space.damage[i, j] for i, j in enumerate(picks)))
        items = ([("prune", {"ratio": base.ratio})] if base.ratio else []) + rest
        cand = Candidate(base.ratio, items, relative, value, self.scorer.drop(value),
                         dict(choices), predicted, picks=tuple(picks) if own else None)
        cand.w8a8_errors = errors or None
        if keep:
            cand.ir, cand.records, cand.ctx = ir, base.records + records, ctx
        self.measured.append(cand)
        del ir, records, ctx
        # The built IR (unless kept), its context and records are cycles of references that
        # only the garbage collector frees: without a collection here SmolLM2's -O2 search
        # held earlier candidates' weights and forwards, 1.2 -> 2.5 GB over three candidates
        # (with one, <= 1.72 GB; issue 18). Then glibc's heap is trimmed.
        return_freed_memory()
        self.seconds["candidates"] += time.perf_counter() - t0
        self.log(f"search: {pipeline_text(items)}: size {relative['size']:.3f}, "
                 f"drop {cand.drop:.4f}")
        return cand

    def _build_items(self, base: _Base, rest: list[tuple[str, dict[str, Any]]]
                     ) -> tuple[IR, list[PassRecord], PassContext, dict[str, float]]:
        """``rest`` (the pipeline after pruning) on a weight-sharing clone of ``base``: the
        built IR, its records and context, and its size / params / latency relative to the
        original."""
        ir = base.ir.clone(share_weights=True)
        records, ctx = self._run(ir, rest, copy_of=base.ir)
        relative = {"size": ir.weight_bytes() / self.original["size"],
                    "params": ir.num_params() / self.original["params"]}
        if "latency" in self.original:
            relative["latency"] = self._latency(ctx) / max(self.original["latency"], 1e-30)
        return ir, records, ctx, relative

    def solve(self, base: _Base, limits: dict[str, float],
              excluded: np.ndarray | None = None) -> list[int]:
        """Picks within ``limits`` (relative to the original) for the pruned ``base``."""
        space = base.space
        damage = space.damage if excluded is None else np.where(excluded, np.inf,
                                                                space.damage)
        absolute = {k: v * self.original[k] for k, v in limits.items()}
        return solve(damage, {k: space.costs[k] for k in limits}, absolute,
                     {k: space.rest[k] for k in limits})

    def _within(self, cand: Candidate, limits: dict[str, float]) -> bool:
        return all(cand.relative[k] <= v * (1 + 1e-6) for k, v in limits.items())

    # -- the two modes -----------------------------------------------------------------------

    def fit(self, budget: Budget, max_drop: float | None, keep: bool = True,
            ratios: Sequence[float] | None = None) -> tuple[Candidate | None, list[str]]:
        """The best measured candidate within ``budget`` (and ``max_drop``), backing off the
        most damaging choices while the measured drop is too large. Returns (candidate or
        None, why each pruning ratio failed)."""
        limits = budget.limits()
        if "latency" in limits and "latency" not in self.original:
            raise UsageError("--budget latency= needs the target's hardware numbers, and this "
                             "target has none in backends/hardware.toml.",
                             hint="Use size= or params=, or a target with a hardware entry "
                             "(see `slimc targets`).")
        unreachable = self._unreachable(limits) if ratios is None else []
        if unreachable:
            return None, unreachable
        if ratios is None and 0.0 in self.techniques.prune_ratios:
            cand = self.lossless(limits, max_drop, keep)
            if cand is not None:
                return cand, []
        best, failures = None, []
        note, int8_faster = self.int8_note()
        if "latency" in limits and note and not int8_faster:
            failures.append(f"int8 activations: {note}")  # why the targets' picks differ
        for ratio in ratios if ratios is not None else self.techniques.prune_ratios:
            base = self.base(ratio)
            for name, barred in self._families(base):
                cand = self._fit_one(base, limits, max_drop, keep, failures, barred, name)
                best = _keep_better(best, cand, lambda a, b: _better(a, b, self.scorer))
            if not ratio:
                for cand in self._uniform(base, limits, max_drop, keep):
                    best = _keep_better(best, cand, lambda a, b: _better(a, b, self.scorer))
            else:
                cand = self._accepted(self.w8a8_candidate(base, limits, keep), limits, max_drop)
                best = _keep_better(best, cand, lambda a, b: _better(a, b, self.scorer))
        if ratios is None:
            cand = self.w8a8_pruned_to(limits, max_drop, keep)
            best = _keep_better(best, cand, lambda a, b: _better(a, b, self.scorer))
        if best is not None:
            best = self.refine(best, limits, max_drop, keep)
        return best, failures

    def refine(self, best: Candidate, limits: dict[str, float], max_drop: float | None,
               keep: bool) -> Candidate:
        """Spend what ``best`` leaves of the budget on its most damaged layers, one at a
        time (at most :data:`REFINE_STEPS` builds): each step gives the next most damaged
        layer its least damaging choice that still fits the budget by the costs, and is kept
        when it measures better; a latency budget is kept :data:`REFINE_LATENCY_MARGIN` clear.
        Why: the knapsack minimises the *proxy* damage, and the measured task metric can
        disagree; on MiniLM / WordSim-353 uniform int4-g32-fz (size 0.156)
        scored above every knapsack candidate at size 0.5 and 0.25 (docs/benchmarks.md), and
        that format with its most damaged layer (layer 5's value projection) at int8 scored
        higher still. Only a uniform format's win (or uniform W8A8's, :meth:`_refine_w8a8`)
        is stepped from: there the proxy and the metric demonstrably disagreed, and a
        knapsack candidate leaves no room to spend."""
        if "latency" in limits:  # slack spent on the cost model's word: keep its error clear
            limits = {**limits, "latency": limits["latency"] * (1 - REFINE_LATENCY_MARGIN)}
        if best.w8a8 is not None and best.w8a8_errors:
            return self._refine_w8a8(best, limits, max_drop, keep)
        if best.uniform is None or best.picks is None or best.prune_ratio not in self._bases:
            return best
        base = self._bases[best.prune_ratio]
        space = base.space
        absolute = {k: v * self.original[k] for k, v in limits.items()}
        order = sorted((i for i, j in enumerate(best.picks) if space.damage[i, j] > 0),
                       key=lambda i: -space.damage[i, best.picks[i]])
        steps = 0
        for i in order:
            if steps >= REFINE_STEPS:
                break
            picks = list(best.picks)
            fits = []
            for j in range(len(space.layers[i].options)):
                picks[i] = j
                used = space.totals(picks)
                if all(used[k] <= absolute[k] for k in limits) \
                        and space.damage[i, j] < space.damage[i, best.picks[i]]:
                    fits.append(j)
            if not fits:
                continue
            picks[i] = min(fits, key=lambda j: space.damage[i, j])
            steps += 1
            kept = self._keep_measured_better(best, self.build(base, picks, keep), limits,
                                              max_drop)
            if kept is not best:
                self.log(f"search: {space.layers[i].layer.name} -> "
                         f"{space.layers[i].options[picks[i]]} measured better; kept")
            best = kept
        return best

    def _keep_measured_better(self, best: Candidate, built: Candidate,
                              limits: dict[str, float], max_drop: float | None) -> Candidate:
        """``built`` when it is within ``limits`` and ``max_drop`` and measures better than
        ``best``, else ``best``; the other one is released."""
        return _keep_better(best, self._accepted(built, limits, max_drop),
                            lambda a, b: _better(a, b, self.scorer))

    def _refine_w8a8(self, best: Candidate, limits: dict[str, float],
                     max_drop: float | None, keep: bool) -> Candidate:
        """:meth:`refine` for a uniform W8A8 win: the layers whose calibrated int8 inputs
        erred most (the quantize pass's ``calib_error``, the W8A8 damage the weight-only
        damage table does not see) are kept fp32, one at a time, each kept when the result
        measures better within the budget (a float layer costs latency: the build's cost
        model decides). Why: on MiniLM `latency=0.5` W8A8 is the one technique that reaches
        the budget, and it left part of it unspent: two of its layers kept fp32 scored
        0.7344 on WordSim-353 against its 0.7306, within the budget by measurement too
        (docs/benchmarks.md, session 28)."""
        recipe = best.w8a8
        base = self._bases.get(recipe.ratio)
        if base is None:
            return best
        order = sorted(best.w8a8_errors, key=lambda n: -best.w8a8_errors[n])
        kept = list(recipe.kept_float)
        for name in [n for n in order if n not in kept][:REFINE_STEPS]:
            built = self._build_w8a8(base, recipe.picks, keep, recipe.prune, [*kept, name])
            built.prune_ratio, built.w8a8_errors = best.prune_ratio, best.w8a8_errors
            better = self._keep_measured_better(best, built, limits, max_drop)
            if better is not best:
                self.log(f"search: W8A8 with {name} kept fp32 measured better; kept")
                best, kept = better, [*kept, name]
        return best

    def _unreachable(self, limits: dict[str, float]) -> list[str]:
        """Why no candidate the search can build meets ``limits``, from the costs alone,
        before the damage table is measured; empty when one can, or when pruning is among the
        techniques (a pruned IR's costs are known only once it is built).

        Why: SmolLM2-135M at `-O2 --budget size=0.10` measured its damage table for 17
        minutes before saying that its smallest formats need 0.105 (session 25), and at
        `--budget latency=0.5` for 12.5 minutes before saying the same of latency (session
        26). A latency budget the per-layer formats miss can still be met by uniform W8A8
        (int8 arithmetic, not in the knapsack's space), so it is priced too."""
        if not limits or tuple(self.techniques.prune_ratios) != (0.0,) or 0.0 in self._bases \
                or self.techniques.lowrank_keeps:  # (the costs-only space has no low rank)
            return []
        if "latency" in limits and "latency" not in self.original:
            return []
        base = self.cost_base()
        try:
            self.solve(base, limits)
        except Infeasible as exc:
            why = [f"prune ratio 0 (all choices): {exc}"]
        else:
            return []
        if "latency" not in limits:
            return why
        w8a8, note = self._w8a8_priced(base, limits)
        return [] if w8a8 else [*why, note]

    def lossless(self, limits: dict[str, float], max_drop: float | None,
                 keep: bool) -> Candidate | None:
        """The cheapest exact format of every layer (:mod:`.exact`: weights already on that
        grid, fp32 where none is), built and measured, when its costs fit ``limits``: no
        candidate can be closer to the original, so the search ends with it and measures no
        damage table. Rounded to nearest: an exact layer rounds to itself, and GPTQ's
        Hessians would cost minutes for nothing. None when no layer is exact, the picks are
        over the budget or the measured drop exceeds ``max_drop``."""
        from .exact import exact_picks

        t0 = time.perf_counter()
        base = self.cost_base()
        found = exact_picks(self.ir, base.space)
        self.seconds["space"] += time.perf_counter() - t0
        if not found.exact_layers:
            return None
        used = base.space.totals(found.picks)
        share = {k: used[k] / max(self.original[k], 1e-30) for k in used}
        layers = len(base.space.layers)
        self.exact = {"layers": layers, "exact": dict(found.formats),
                      "relative": {k: round(v, 5) for k, v in share.items()}, "used": False}
        what = (f"{found.exact_layers} of {layers} weights already lie on a format's grid ("
                + ", ".join(f"{n} x{c}" for n, c in found.formats.most_common()) + ")")
        over = [k for k in limits if share[k] > limits[k] * (1 + 1e-6)]
        if over:
            self.exact["why_not"] = ("over the budget in " + ", ".join(
                f"{k} ({share[k]:.3f} > {limits[k]:g})" for k in over))
            self.log(f"search: {what}; exact there and fp32 elsewhere is "
                     f"{self.exact['why_not']}")
            return None
        rtn = replace(self.techniques, quantize_method="rtn", act_order=False)
        cand = self._accepted(self.build(base, found.picks, keep,
                                         self.items(base, found.picks, rtn)),
                              limits, max_drop)
        if cand is None:
            self.exact["why_not"] = "over the budget or --max-drop once built"
            return None
        self.exact["used"] = True
        self.log(f"search: {what}: those formats and fp32 elsewhere lose nothing and fit "
                 "the budget; no damage table needed")
        return cand

    def _w8a8_priced(self, base: _Base, limits: dict[str, float]) -> tuple[bool, str]:
        """Whether uniform W8A8 on ``base`` fits ``limits`` by the costs (with
        :meth:`w8a8_candidate`'s 2% allowance for its activation scales), and a sentence on
        its price or on why it is not tried, for a refusal."""
        from slimc.passes.analysis.cost import int8_peak, target_dot_product

        if not self.techniques.w8a8:
            return False, ("W8A8 (int8 arithmetic): not tried, it needs --calib data for its "
                           "activation scales")
        dot = target_dot_product(self.ctx)
        if dot is None or self.hw is None:
            return False, ("W8A8 (int8 arithmetic): not tried, the target has no int8 "
                           "dot-product instructions")
        picks, used = self._w8a8_costs(base, int8_peak(self.hw, dot))
        if not any(picks):
            return False, "W8A8 (int8 arithmetic): no layer can take int8 weights"
        over = self._w8a8_over(used, limits)
        share = used["latency"] / max(self.original["latency"], 1e-30)
        return not over, (f"uniform W8A8 (int8 arithmetic, {dot}) is priced at latency "
                          f"{share:.3f} of the original"
                          + (f", over the budget in {', '.join(over)}" if over else ""))

    def _accepted(self, cand: Candidate | None, limits: dict[str, float],
                  max_drop: float | None) -> Candidate | None:
        """``cand`` when it is within ``limits`` and ``max_drop``; else released, None."""
        if cand is None:
            return None
        if self._within(cand, limits) and (max_drop is None or cand.drop <= max_drop):
            return cand
        cand.release()
        return None

    def _uniform(self, base: _Base, limits: dict[str, float], max_drop: float | None,
                 keep: bool) -> list[Candidate]:
        """Every format of :attr:`Techniques.formats` on every layer, where that fits the
        budget by the costs, built and measured: the single techniques the budget allows.
        Why: the knapsack minimises the summed *proxy* damage (output divergence), and on
        MiniLM / WordSim-353 the int4-fz grids, further from the original outputs than int8,
        scored higher on the task (docs/benchmarks.md, re-run 2026-12-01), so the search
        ended below a single technique at size 0.5 and 0.25; measuring them too keeps it from
        ending below any of them on the measured metric (a handful of builds)."""
        space, out = base.space, []
        absolute = {k: v * self.original[k] for k, v in limits.items()}
        seen: set[tuple[int, ...]] = set()
        for fmt in self.techniques.formats:
            picks = tuple(next((j for j, o in enumerate(c.options)
                                if o.rank is None and str(o.fmt) == fmt), 0)
                          for c in space.layers)
            if picks in seen or not any(picks):
                continue
            seen.add(picks)
            used = space.totals(picks)
            if any(used[k] > absolute[k] for k in limits):
                continue
            cand = self.build(base, picks, keep)
            cand.uniform = fmt
            if self._within(cand, limits) and (max_drop is None or cand.drop <= max_drop):
                out.append(cand)
            else:
                cand.release()
        cand = self._accepted(self.w8a8_candidate(base, limits, keep), limits, max_drop)
        return out + ([cand] if cand is not None else [])

    def w8a8_candidate(self, base: _Base, limits: dict[str, float], keep: bool) -> Candidate | None:
        """Uniform W8A8 (``quantize{weights=int8,activations=int8}``), built and measured when
        :attr:`Techniques.w8a8` (calibration data given) and its costs fit. Why: weight-only
        formats compute in float, so on compute-bound matmuls (MiniLM on every target in
        the table) only fewer FLOPs or int8 arithmetic lowers the latency; the int8 inputs
        are no per-layer choice in the damage table (their damage is the calibrated
        activation scales', known once built), so the whole-model recipe is measured as a
        candidate beside the uniform formats. Skipped where the target has no int8 dot
        product (no faster than weight-only int8 there, :func:`.cost.int8_peak`). Built on
        every pruning ratio's IR (``prune`` then W8A8): where uniform W8A8 alone is just over a
        latency budget (MiniLM at 0.5 once its quantize kernels are priced, docs/benchmarks.md),
        fewer FFN channels and heads are what brings the int8 matmuls under it."""
        from slimc.passes.analysis.cost import int8_peak, target_dot_product

        if not self.techniques.w8a8:
            return None
        dot = target_dot_product(self.ctx)
        if dot is None:
            self.log("search: W8A8 not tried: the target has no int8 dot-product "
                     "instructions (no faster than weight-only int8)")
            return None
        picks, used = self._w8a8_costs(base, int8_peak(self.hw, dot) if self.hw else None)
        if not any(picks):
            return None
        over = self._w8a8_over(used, limits)
        if over:
            self.log(f"search: uniform W8A8 at prune ratio {base.ratio:g} not built: priced "
                     + ", ".join(f"{k} {used[k] / self.original[k]:.3f}" for k in over)
                     + " of the original, over the budget")
            return None
        return self._build_w8a8(base, picks, keep, [])

    def _w8a8_over(self, used: dict[str, float], limits: dict[str, float]) -> list[str]:
        """The budgets uniform W8A8's costs ``used`` (absolute) exceed, with 2% allowed for
        its activation scales, which the per-layer costs do not count."""
        return [k for k in limits if used[k] > limits[k] * self.original[k] * 1.02]

    def int8_note(self) -> tuple[str | None, bool]:
        """What int8 arithmetic (W8A8) does on this target, for the report's "Target costs"
        line (:func:`describe_hardware`), and whether it makes matmuls faster here. Why: the
        same ``--budget latency=`` on MiniLM is met by W8A8 on a VNNI host and not at all on
        the Raspberry Pi 4, where the search does not try it (no sdot); the log said so, the
        report did not."""
        from slimc.passes.analysis.cost import int8_peak, target_dot_product

        if self.hw is None:
            return None, False
        dot = target_dot_product(self.ctx)
        if dot is None:
            return ("no int8 dot-product instructions on this target: W8A8 would multiply at "
                    "the fp32 rate and is not tried, and weight-only formats dequantize and "
                    "multiply in float, so no precision choice makes compute-bound layers "
                    "faster"), False
        peak, fp32 = int8_peak(self.hw, dot), self.hw.peak_flops("float32")
        rate = (f"int8 x int8 (W8A8) priced at {peak / 1e9:g} GOP/s "
                f"({peak / fp32:.1f}x fp32, {dot}) plus one activation-quantize kernel per "
                "linear")
        if not self.techniques.w8a8:
            return rate + ": not tried (W8A8 needs --calib data for its activation scales)", \
                False
        return rate, peak > fp32

    def _w8a8_costs(self, base: _Base, peak: float | None
                    ) -> tuple[list[int], dict[str, float]]:
        """The int8 pick of every layer of ``base`` and the costs of uniform W8A8 on it
        (absolute): latency with the linears at ``peak`` and their quantize kernels."""
        space = base.space
        picks = [next((j for j, o in enumerate(c.options)
                       if o.rank is None and o.fmt.kind == "int8"), 0) for c in space.layers]
        used = space.totals(picks)
        if peak is not None and "latency" in space.costs:
            used["latency"] = space.rest["latency"] + sum(
                option_costs(c, c.options[j], self.hw, peak)["latency"]
                for c, j in zip(space.layers, picks, strict=True))
        return picks, used

    def _build_w8a8(self, base: _Base, picks: Sequence[int], keep: bool,
                    prune: list[tuple[str, dict[str, Any]]],
                    kept_float: Sequence[str] = ()) -> Candidate:
        """Uniform W8A8 after ``prune``; the layers named in ``kept_float`` stay fp32
        (:meth:`refine`)."""
        quantize: dict[str, Any] = {"weights": "int8", "activations": "int8"}
        if kept_float:
            quantize["layers"] = ",".join(f"{name}=fp32" for name in kept_float)
        rest = prune + [("quantize", quantize), ("eliminate-dead-code", {})]
        space = base.space
        w8a8 = sum(1 for c, j in zip(space.layers, picks, strict=True)
                   if j and takes_int8_activations(c.layer) and c.layer.name not in kept_float)
        choices = {"int8+a8 (W8A8)": w8a8, "fp32": len(kept_float),
                   "int8": sum(1 for j in picks if j) - w8a8 - len(kept_float)}
        cand = self.build(base, picks, keep, rest, {k: v for k, v in choices.items() if v})
        cand.w8a8 = W8A8Recipe(base.ratio, tuple(picks), prune, tuple(kept_float))
        return cand

    def w8a8_pruned_to(self, limits: dict[str, float], max_drop: float | None,
                       keep: bool) -> Candidate | None:
        """W8A8 on the IR pruned by the *smallest* ratio that brings it within a latency
        budget, when uniform W8A8 alone is over it and the technique set's largest pruning
        ratio is under it (both by the costs). Why: pruning's damage grows with the ratio,
        and the set's fixed ratios (0, 0.2) jump past the point where the int8 matmuls fit:
        on MiniLM W8A8 is priced 0.502 at latency=0.5 and pruning 0.2 costs 4% of
        WordSim-353 (docs/benchmarks.md, issue 17). The ratio is interpolated between the two
        priced ends (the pruned linears' FLOPs fall with it), built and measured; a built
        candidate still over the budget moves the ratio on (secant steps through the built
        points), twice at most. No damage table is built for it: its measured drop decides,
        as for every candidate.

        On a model with attention heads, MLP channels alone (``granularity=channel``, kept
        counts in whole vector tiles) are tried first, up to :data:`MLP_PRUNE_CAP`: per FLOP
        removed they cost far less quality than heads (MiniLM with W8A8: a quarter of the FFN
        channels lost 1.3% of WordSim-353, channels and heads at 0.2 lost 4.9%), and they are
        two thirds of a transformer block's linear FLOPs; channels and heads together come
        only when that misses the budget or ``max_drop``. The ratio aims
        :data:`PRUNE_LATENCY_MARGIN` under the budget: W8A8 priced 0.501 at 0.5 on znver4 led
        to a 1% prune (16 FFN channels a layer) priced 0.498 that measured no faster than
        W8A8 itself; pruning added only to meet a latency budget should remove more work than
        the cost model's error on the artifacts (1-8%, docs/benchmarks.md)."""
        from slimc.passes.analysis.cost import int8_peak, target_dot_product

        top = max(self.techniques.prune_ratios, default=0.0)
        dot = target_dot_product(self.ctx)
        if (not self.techniques.w8a8 or "latency" not in limits or not top or dot is None
                or self.hw is None or "latency" not in self.original):
            return None
        peak = int8_peak(self.hw, dot)
        goal = limits["latency"] * self.original["latency"]
        base = self.base(0.0)
        picks, used = self._w8a8_costs(base, peak)
        aim = goal * (1 - PRUNE_LATENCY_MARGIN)
        top_base = self.base(top)
        _, pruned = self._w8a8_costs(top_base, peak)
        low, high = used["latency"], pruned["latency"]
        if not any(picks) or low <= goal or high > goal or low <= high:
            return None
        if _prunes_heads(top_base.ir):
            cand = self._w8a8_secant(base, picks, keep, limits, max_drop, aim, low,
                                     (top, high), MLP_PRUNE_CAP, {"granularity": "channel"})
            if cand is not None:
                return cand
        return self._w8a8_secant(base, picks, keep, limits, max_drop, aim, low,
                                 (top, high), top, {})

    def _w8a8_secant(self, base: _Base, picks: Sequence[int], keep: bool,
                     limits: dict[str, float], max_drop: float | None, goal: float,
                     low: float, prior: tuple[float, float], cap: float,
                     options: dict[str, Any]) -> Candidate | None:
        """``prune{ratio=r, **options}`` + W8A8 at the ratio where the latency line reaches
        ``goal`` (rounded up to 0.01, below ``cap``): first the line from the unpruned
        W8A8's ``low`` to the ``prior`` (ratio, latency) point, then the secant through the
        last two built points; three builds at most. The accepted candidate (within the
        budget and ``max_drop``) or None."""
        built: list[tuple[float, float]] = []
        for _ in range(3):
            points = [(0.0, low), *built] if built else [(0.0, low), prior]
            (r0, a0), (r1, a1) = points[-2], points[-1]
            slope = (a0 - a1) / (r1 - r0) if r1 > r0 else 0.0
            if slope <= 0:
                return None
            start_r, start_a = built[-1] if built else (0.0, low)
            ratio = math.ceil(100 * (start_r + (start_a - goal) / slope)) / 100
            if ratio >= cap or ratio <= start_r:  # the set's own ratio is built by fit already
                return None
            cand = self._build_w8a8(base, picks, keep, [("prune", {"ratio": ratio, **options})])
            cand.prune_ratio = ratio
            if self._within(cand, limits):
                return self._accepted(cand, limits, max_drop)
            built.append((ratio, cand.relative["latency"] * self.original["latency"]))
            cand.release()
        return None

    def _families(self, base: _Base) -> list[tuple[str, np.ndarray]]:
        """Option families solved separately and compared by measurement: every choice, and
        precision alone. The damage table predicts each layer alone; measured on MiniLM, its
        low-rank entries looked cheaper than they were once many layers changed together, so
        the all-choices solution lost to precision alone (docs/benchmarks.md); measuring both
        keeps the search from doing worse than its best single technique."""
        space = base.space
        width = space.damage.shape[1]
        none = np.zeros(space.damage.shape, dtype=bool)
        lowrank = np.array([[o.rank is not None for o in c.options]
                            + [False] * (width - len(c.options)) for c in space.layers])
        if not lowrank.any():
            return [("all", none)]
        return [("all", none), ("precision", lowrank)]

    def _fit_one(self, base: _Base, limits: dict[str, float], max_drop: float | None,
                 keep: bool, failures: list[str], barred: np.ndarray | None = None,
                 family: str = "all") -> Candidate | None:
        space = base.space
        excluded = np.zeros(space.damage.shape, dtype=bool) if barred is None \
            else barred.copy()
        where = f"prune ratio {base.ratio:g} ({family} choices)"
        tightened = dict(limits)
        backoffs, last_drop = 0, None
        for _ in range(self.max_backoffs + 3):
            try:
                picks = self.solve(base, tightened, excluded)
            except Infeasible as exc:
                # after back-offs the budget was met before: say that it is the excluded
                # choices (not the budget alone) that leave nothing (MiniLM's latency=0.5
                # report read as if no low-rank pick fitted, next to three built at 0.497)
                why = "" if last_drop is None else (
                    f"after {backoffs} back-off round(s) (measured drop {last_drop:.2%} > "
                    f"--max-drop {max_drop:g}; its most damaging choices excluded), ")
                failures.append(f"{where}: {why}{exc}")
                return None
            cand = self.build(base, picks, keep)
            cand.backoffs = backoffs
            if not self._within(cand, limits):  # rounding or the cost model disagreed
                cand.release()
                for k, v in limits.items():
                    if cand.relative[k] > v:
                        tightened[k] = tightened[k] * v / cand.relative[k] * 0.995
                continue
            if max_drop is None or cand.drop <= max_drop:
                return cand
            last_drop = cand.drop
            cand.release()
            if backoffs >= self.max_backoffs:
                break
            backoffs += 1
            order = sorted((i for i, j in enumerate(picks) if space.damage[i, j] > 0),
                           key=lambda i: -space.damage[i, picks[i]])
            if not order:
                break
            count = min(len(order), 1 + int(min(cand.drop / max(max_drop, 1e-12), 4.0)))
            for i in order[:count]:
                excluded[i] |= space.damage[i] >= space.damage[i, picks[i]]
                excluded[i, 0] = False  # fp32 stays possible
        failures.append(f"{where}: the measured drop stayed above "
                        f"{max_drop:g} after {backoffs} back-off rounds")
        return None

    def minimize(self, objective: str, max_drop: float,
                 keep: bool = True) -> Candidate | None:
        """The candidate with the smallest ``objective`` (size or latency, measured) whose
        drop is within ``max_drop``: per pruning ratio and family, probes of the budget placed
        by the damage table's calibrated prediction (:mod:`.probes`; ``PROBES = "bisect"``:
        bisection)."""
        if objective not in self.original:
            objective = "size"
        smallest = self._bisect if _probe_placement() == "bisect" else self._predicted_probes
        best = None
        for ratio in self.techniques.prune_ratios:
            base = self.base(ratio)
            for _, barred in self._families(base):
                cand = smallest(base, objective, max_drop, keep, barred)
                best = _keep_better(best, cand, lambda a, b: a.relative[objective]
                                    < b.relative[objective])
        return best

    def _budget_range(self, base: _Base, objective: str, barred: np.ndarray
                      ) -> tuple[float, float]:
        """(just above the smallest reachable, the uncompressed) ``objective`` relative to
        the original: where a budget-less search looks."""
        space = base.space
        allowed = np.isfinite(space.costs[objective]) & ~barred
        low = (space.rest[objective] + float(np.where(allowed, space.costs[objective],
                                                      np.inf).min(axis=1).sum())) \
            / self.original[objective]
        high = space.info["fp32"][objective] / self.original[objective]
        return max(low, 1e-6) * 1.001, high

    def _predicted_probes(self, base: _Base, objective: str, max_drop: float, keep: bool,
                          barred: np.ndarray) -> Candidate | None:
        """The smallest budget whose built candidate stays within ``max_drop``, each probe
        placed where the damage table's prediction, calibrated by the candidates measured so
        far, says the drop reaches ``max_drop`` (:mod:`.probes`); at most
        ``BISECTION_STEPS`` builds, as the bisection. Why: each probe is a whole candidate
        build (~7 s on a 320M decoder) and the bisection's midpoints ignored what the table
        predicts: 5 builds on the 320M where 2-3 land as close (issue 18)."""
        space = base.space
        low, high = self._budget_range(base, objective, barred)
        curve = PredictedCurve(space.costs[objective], np.where(barred, np.inf, space.damage),
                               space.rest[objective], self.original[objective])
        probes: list[Probe] = []
        best = None
        seen: dict[tuple[int, ...], Candidate] = {}
        builds, infeasible = 0, 0.0
        for _ in range(4 * BISECTION_STEPS):  # a probe whose picks were built is no build
            budget = next_budget(curve, probes, max_drop, low, high)
            if budget is None or (not probes and budget <= infeasible):
                break  # (a narrow range's end that the solver could not meet: no build)
            try:
                picks = self.solve(base, {objective: budget}, barred)
            except Infeasible:
                low = infeasible = budget
                continue
            cand = seen.get(tuple(picks))
            if cand is None:  # another budget, the same picks: measured already
                cand = seen[tuple(picks)] = self.build(base, picks, keep)
                builds += 1
                if cand.drop <= max_drop:
                    best = _keep_better(best, cand, lambda a, b: a.relative[objective]
                                        < b.relative[objective])
                else:
                    cand.release()
            probes.append(Probe(budget, float(curve.at(budget)), cand.drop))
            self.log(f"search: {objective} budget {budget:.5f}: predicted drop "
                     f"{probes[-1].predicted:.4g}, measured {cand.drop:.4g}")
            if builds >= BISECTION_STEPS:
                break
        return best

    def _bisect(self, base: _Base, objective: str, max_drop: float, keep: bool,
                barred: np.ndarray) -> Candidate | None:
        """The budget bisected in log scale (``BISECTION_STEPS`` steps, each a build unless
        its picks were built already): before the predicted probes, kept for comparison."""
        lo, hi = (math.log(x) for x in self._budget_range(base, objective, barred))
        best = None
        seen: dict[tuple[int, ...], Candidate] = {}
        for _ in range(BISECTION_STEPS):
            mid = math.exp((lo + hi) / 2)
            try:
                picks = self.solve(base, {objective: mid}, barred)
            except Infeasible:
                lo = math.log(mid)
                continue
            prior = seen.get(tuple(picks))
            if prior is not None:  # another budget, the same picks: measured already (and
                # already weighed against ``best``); building it again costs a whole candidate
                if prior.drop <= max_drop:
                    hi = math.log(mid)
                else:
                    lo = math.log(mid)
                continue
            cand = self.build(base, picks, keep)
            seen[tuple(picks)] = cand
            if cand.drop <= max_drop:
                hi = math.log(mid)
                best = _keep_better(best, cand, lambda a, b: a.relative[objective]
                                    < b.relative[objective])
            else:
                cand.release()
                lo = math.log(mid)
        return best


def _prunes_heads(ir: IR) -> bool:
    """Whether the ``prune`` pass removed attention heads from ``ir`` (its annotation)."""
    groups = ir.annotations.get("prune", {}).get("groups", [])
    return any(g.get("kind") in HEAD_KINDS for g in groups)


def _probe_placement() -> str:
    """:data:`PROBES`, or ``$SLIMC_SEARCH_PROBES`` (``predicted`` / ``bisect``) for one run
    (side-by-side measurements)."""
    value = os.environ.get("SLIMC_SEARCH_PROBES", PROBES)
    return value if value in ("predicted", "bisect") else PROBES


def _keep_better(best: Candidate | None, cand: Candidate | None,
                 better: Callable[[Candidate, Candidate], bool]) -> Candidate | None:
    """The better of ``best`` and ``cand``; the other one's IR is released (measurements
    stay in :attr:`Search.measured`)."""
    if cand is None:
        return best
    if best is None:
        return cand
    if better(cand, best):
        best.release()
        return cand
    cand.release()
    return best


def _better(a: Candidate, b: Candidate, scorer: Scorer) -> bool:
    """Lower measured drop wins; then smaller size."""
    return (a.drop, a.relative["size"]) < (b.drop, b.relative["size"])


def describe_hardware(space: Space, int8: str | None = None, int8_faster: bool = False) -> str:
    """Why this target's costs favour what they favour: how many layers are bound by memory
    bandwidth (fewer bytes per weight helps) vs arithmetic (fewer FLOPs, or int8 arithmetic
    where the target multiplies int8 faster: ``int8_faster``; ``int8`` says why, from
    :meth:`Search.int8_note`).
    Why the int8 sentence: on a compute-bound model (MiniLM) W8A8 is what meets a latency
    budget on a VNNI host and is not tried on the Raspberry Pi 4 (no sdot), so the same budget
    picks W8A8 on one target and fails or prunes on the other; the report must say so."""
    hw = space.hardware
    if not hw:
        return "no hardware numbers for this target: latency not modelled"
    bw = hw["mem_bandwidth_gbs"] * 1e9
    peak = hw["peak_gflops"].get("float32", 0) * 1e9
    memory = compute = 0
    for c in space.layers:
        n, k = c.shape
        if c.rows:
            if 4.0 * (n * k + c.rows * (n + k)) / bw > 2.0 * c.rows * n * k / max(peak, 1):
                memory += 1
            else:
                compute += 1
    faster = "only fewer FLOPs (pruning or low rank)" + (" or int8 arithmetic (W8A8)"
                                                         if int8_faster else "")
    return (f"{hw['name']}: {hw['peak_gflops'].get('float32', 0):g} GFLOP/s fp32, "
            f"{hw['mem_bandwidth_gbs']:g} GB/s, {hw['op_overhead_us']:g} us per op; at fp32 "
            f"{memory} of {memory + compute} matmul layers are memory-bound (fewer bytes per "
            f"weight makes them faster) and {compute} compute-bound ({faster} makes them "
            "faster; an extra op costs its overhead)" + (f"; {int8}" if int8 else ""))
