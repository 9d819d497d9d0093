"""What every sensitivity criterion shares: options, the result shape and the scoring loop.

A criterion answers, for each weight-bearing layer and each candidate setting, "how much does
the model's output suffer if only this layer is compressed like this?". Proxy criteria
(magnitude, activation, taylor, hessian) estimate it from statistics gathered once; the
``perturbation`` criterion measures it. All report the same shape so they can be compared and
a search can read any of them.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from slimc.passes.analysis.criteria.candidates import (
    Setting,
    SvdFactors,
    settings_from,
    svd_factors,
)
from slimc.passes.analysis.criteria.groups import (
    GroupCandidate,
    GroupSensitivity,
    group_candidates,
    groups_json,
    score_groups,
)
from slimc.passes.analysis.layers import Layer, weight_layers

from slimc.errors import UsageError
from slimc.ir import IR
from slimc.passmanager import AnalysisPass, PassContext, PassOptions


class SensitivityOptions(PassOptions):
    """Candidate settings and how much calibration data to use."""

    #: Weight bit widths to score (round-to-nearest, per output channel).
    bits: tuple[int, ...] = (8, 4, 3, 2)
    #: Fractions of output channels kept by magnitude pruning.
    keep_ratios: tuple[float, ...] = (0.75, 0.5)
    #: Fractions of the full rank kept by truncated SVD.
    rank_ratios: tuple[float, ...] = (0.5, 0.25)
    #: Setting whose value is a layer's single ``score`` (used for rankings).
    reference: str = "q4"
    #: At most this many calibration batches are used.
    max_batches: int = 4
    seed: int = 0
    #: Also score the prune-groups' groups (heads, MLP neurons, conv filters) and blocks.
    groups: bool = True
    #: Fractions of a group's units kept (lowest-magnitude units removed first).
    group_keep_ratios: tuple[float, ...] = (0.75, 0.5, 0.25)


@dataclass
class LayerSensitivity:
    name: str
    module_type: str
    kind: str
    weight: str
    ops: list[str]
    params: int
    #: setting key -> estimated (or measured) output damage; larger = more sensitive.
    curve: dict[str, float]
    #: Criterion-specific statistics (e.g. the Hessian trace).
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class SensitivityResult:
    criterion: str
    settings: list[str]
    reference: str
    layers: dict[str, LayerSensitivity]
    seconds: float = 0.0
    batches: int = 0
    #: Prunable group / block name -> damage curve over keep ratios (see :mod:`.groups`).
    groups: dict[str, GroupSensitivity] = field(default_factory=dict)
    #: Why groups were not scored, if they were not.
    groups_error: str | None = None

    def scores(self, setting: str | None = None) -> dict[str, float]:
        """Layer name -> value at ``setting`` (default: the reference setting)."""
        key = setting or self.reference
        return {name: layer.curve[key] for name, layer in self.layers.items()}

    def ranking(self, setting: str | None = None) -> list[str]:
        """Layer names, most sensitive first."""
        scores = self.scores(setting)
        return sorted(scores, key=lambda n: -scores[n])

    def to_json(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "settings": self.settings,
                "reference": self.reference, "seconds": round(self.seconds, 3),
                "batches": self.batches,
                "layers": {k: asdict(v) for k, v in self.layers.items()},
                "groups": groups_json(self.groups), "groups_error": self.groups_error}


def _svds(ir: IR, ctx: PassContext, layers: list[Layer],
          weights: dict[str, torch.Tensor]) -> dict[str, SvdFactors]:
    """The SVD of each layer's canonical weight, computed once per IR version and shared by
    every criterion through the context's memo (rank settings need it; five criteria each
    taking their own cost five times the SVDs). The SVDs run one layer per core with
    single-threaded LAPACK (:func:`slimc.jobs.map_single_threaded`): a 2-thread SVD of a
    MiniLM-sized matrix cost 2-6x the CPU of a 1-thread one."""
    from slimc.jobs import map_single_threaded

    # Keyed by the IR object itself, weakly: an ``id()`` can be reused by a new clone once an
    # old one is freed (search contexts share one memo), and the SVDs die with their IR.
    per_ir = ctx.memo.setdefault("sensitivity-svd", weakref.WeakKeyDictionary())
    version, svds = per_ir.get(ir, (None, None))
    if version != ir.version:
        found = map_single_threaded(
            lambda layer: svd_factors(layer.canonical(weights[layer.weight.name].detach())),
            layers)
        svds = {layer.name: f for layer, f in zip(layers, found, strict=True)}
        per_ir[ir] = (ir.version, svds)
    return svds


class SensitivityCriterion(AnalysisPass):
    """Base of ``sensitivity-<criterion>`` passes: subclasses gather statistics in
    :meth:`prepare` and turn a weight change into a damage estimate in :meth:`damage`."""

    #: The criterion's name as ``sensitivity{criterion=...}`` spells it.
    criterion: ClassVar[str] = ""
    #: Needs calibration data (the result is less reliable on synthetic inputs).
    data_aware: ClassVar[bool] = True
    Options: ClassVar[type[PassOptions]] = SensitivityOptions

    def run(self, ir: IR, ctx: PassContext, options: PassOptions) -> SensitivityResult:
        assert isinstance(options, SensitivityOptions)
        start = time.perf_counter()
        settings = settings_from(options.bits, options.keep_ratios, options.rank_ratios)
        keys = [s.key for s in settings]
        if options.reference not in keys:
            raise UsageError(f"Reference setting {options.reference!r} is not among the "
                             f"candidate settings {keys}.")
        layers = weight_layers(ir)
        torch.manual_seed(options.seed)
        batches = self.prepare(ir, ctx, options, layers)
        weights = ir.weights()
        factors = _svds(ir, ctx, layers, weights) if any(
            s.kind == "low_rank" for s in settings) else {}

        def score(job: tuple[Layer, Setting]) -> float:
            layer, setting = job
            # Criteria see the canonical orientation (outputs first, inputs last) whether the
            # model stores W, W.T or a permutation of it (see slimc.layers).
            weight = layer.canonical(weights[layer.weight.name].detach())
            compressed = setting.apply(weight, layer.canonical_output_axis,
                                       factors.get(layer.name))
            return self.damage(layer, weight, compressed, setting)

        items = {layer.name: keys for layer in layers}
        wanted = self.scored_jobs(ir, ctx, options, "layers", items)
        jobs = [(layer, setting) for layer in layers for setting in settings
                if wanted is None or (layer.name, setting.key) in wanted]
        curves: dict[str, dict[str, float]] = {}
        for (layer, setting), value in zip(jobs, self.map_jobs(score, jobs), strict=True):
            curves.setdefault(layer.name, {})[setting.key] = value
        if wanted is not None:
            curves = self.fill_unscored("layers", curves, items)
        results = {}
        for layer in layers:
            results[layer.name] = LayerSensitivity(
                layer.name, layer.module_type, layer.kind, layer.weight.name,
                [op.name for op in layer.ops], weights[layer.weight.name].numel(),
                curves[layer.name], self.extra(layer))
        result = SensitivityResult(self.criterion, keys, options.reference, results, 0.0,
                                   batches)
        if options.groups:
            self._score_groups(ir, ctx, options, layers, weights, result)
        result.seconds = time.perf_counter() - start
        return result

    def _score_groups(self, ir: IR, ctx: PassContext, options: SensitivityOptions,
                      layers: list[Layer], weights: dict[str, torch.Tensor],
                      result: SensitivityResult) -> None:
        try:
            candidates = group_candidates(ir, ctx, options.group_keep_ratios)
        except Exception as exc:  # noqa: BLE001 - the graph analysis is best effort here
            result.groups_error = f"prune-groups failed: {type(exc).__name__}: {exc}"
            return
        by_weight = {layer.weight.name: layer for layer in layers}
        result.groups = score_groups(
            candidates, weights,
            lambda cand, key, overrides: self.group_damage(cand, key, overrides, by_weight,
                                                           weights), self.map_jobs,
            select=lambda items: self.scored_jobs(ir, ctx, options, "groups", items),
            fill=lambda measured, items: self.fill_unscored("groups", measured, items))

    def map_jobs(self, fn: Callable[[Any], float], jobs: list) -> list[float]:
        """``[fn(job) for job in jobs]``: the (layer or group, setting) scores, one per core
        with single-threaded torch ops (:func:`slimc.jobs.map_single_threaded`). Each is a few
        whole-tensor ops (round, subtract, square, sum) on one weight: on SmolLM2-135M the
        data-free magnitude criterion spent most of its time there, one score after another
        on a 2-thread pool that synchronised on every op."""
        from slimc.jobs import map_single_threaded

        return map_single_threaded(fn, jobs)

    def group_damage(self, candidate: GroupCandidate, key: str,
                     overrides: dict[str, torch.Tensor], layers: dict[str, Layer],
                     weights: dict[str, torch.Tensor]) -> float:
        """Damage of removing ``candidate``'s units at ``key``. Proxies: the sum of their
        per-layer damage over the weight layers touched (biases and norms not counted)."""
        setting = Setting("prune", float(key.removeprefix("keep")))
        return float(sum(self.damage(layers[w], layers[w].canonical(weights[w].detach()),
                                     layers[w].canonical(value), setting)
                         for w, value in overrides.items() if w in layers))

    def prepare(self, ir: IR, ctx: PassContext, options: SensitivityOptions,
                layers: list[Layer]) -> int:
        """Gather statistics; returns how many calibration batches were used."""
        return 0

    def scored_jobs(self, ir: IR, ctx: PassContext, options: SensitivityOptions, kind: str,
                    items: dict[str, list[str]]) -> set[tuple[str, str]] | None:
        """The (item, setting key) pairs to score for real, of ``items`` (name -> its setting
        keys; ``kind`` is ``layers`` or ``groups``). None (the default): all of them. The
        others get their values from :meth:`fill_unscored` (``perturbation`` measures only
        where the proxies disagree, see :mod:`.selective`)."""
        return None

    def fill_unscored(self, kind: str, measured: dict[str, dict[str, float]],
                      items: dict[str, list[str]]) -> dict[str, dict[str, float]]:
        """Full curves for every item, given the values of the :meth:`scored_jobs`."""
        raise NotImplementedError

    def damage(self, layer: Layer, weight: torch.Tensor, compressed: torch.Tensor,
               setting: Setting) -> float:
        raise NotImplementedError

    def extra(self, layer: Layer) -> dict[str, float]:
        return {}
