"""``sensitivity-perturbation``: measured output change when one layer alone is compressed.

No proxy: for each layer and setting, the graph runs on the calibration batches with only that
layer's weight replaced by its compressed version, and the change of the first output is
measured (KL for logits, 1 - cosine for embeddings, relative L2 otherwise; see
:mod:`.divergence`). Prunable groups (heads, neurons, blocks) are measured the same way,
with all their units' slices zeroed at once, or a block's residual adds skipped (see
:mod:`.groups`). It costs one forward pass per (layer or group, setting, batch), which is why it
processes batches of the captured shape and the settings are options.

With ``select=disagree`` (``slimc analyze``'s default) only the layers and groups the cheap
proxies rank differently, plus a few anchors, are measured; the others get the ``taylor``
estimate scaled to the measurements (see :mod:`.selective`). ``select=all`` (the pass default)
measures every layer and group.
"""

from __future__ import annotations

from typing import Literal

import torch
from slimc.passes.analysis.criteria.base import SensitivityCriterion, SensitivityOptions
from slimc.passes.analysis.criteria.candidates import Setting
from slimc.passes.analysis.criteria.divergence import divergence, output_kind
from slimc.passes.analysis.criteria.execution import (
    SuffixRunner,
    calibration_batches,
    run_graph,
)
from slimc.passes.analysis.criteria.groups import run_without_block
from slimc.passes.analysis.criteria.selective import (
    ESTIMATOR,
    PROXIES,
    choose_layers,
    fill_curves,
    voters,
)
from slimc.passes.analysis.layers import Layer

from slimc.ir import IR
from slimc.passmanager import PassContext


def measure_output_change(ir: IR, batches: list[list[torch.Tensor]],
                          references: list[torch.Tensor], weight_name: str | None,
                          compressed: torch.Tensor | None = None, *,
                          overrides: dict[str, torch.Tensor] | None = None,
                          skip_adds: dict[str, int] | None = None,
                          runners: list[SuffixRunner] | None = None) -> float:
    """Mean divergence of the first output over ``batches`` with one weight replaced (or the
    weights in ``overrides``; or, with ``skip_adds``, a residual block removed). ``runners``
    (one :class:`SuffixRunner` per batch) run only the graph after the first changed op."""
    kind = output_kind(ir.output_names[0])
    replaced = dict(overrides or {})
    if weight_name is not None:
        replaced[weight_name] = compressed
    total = 0.0
    for i, (batch, reference) in enumerate(zip(batches, references, strict=True)):
        if skip_adds:
            output = run_without_block(ir, batch, skip_adds)[0]
        elif runners is not None:
            output = runners[i].run(replaced)[0]
        else:
            output = run_graph(ir, batch, replaced)[0]
        total += divergence(kind, reference, output)
    return total / len(batches)


class PerturbationOptions(SensitivityOptions):
    #: ``disagree``: measure only where the proxies disagree (and the anchors; ``slimc
    #: analyze``'s default); ``all``: every layer (the default here, so passes that read this
    #: criterion, e.g. ``quantize{mixed}`` and ``lowrank{allocation=sensitivity}``, keep
    #: reading measurements).
    select: Literal["disagree", "all"] = "all"
    #: Smallest spread of a layer's percentile ranks under the proxies that gets it measured.
    threshold: float = 0.2
    #: Layers measured regardless, evenly spaced along the proxies' consensus ranking.
    anchors: int = 5
    #: Settings a chosen layer is measured at: ``reference`` (its other settings follow the
    #: taylor curve's shape at the measured level) or ``all``.
    measure_settings: Literal["reference", "all"] = "reference"
    #: A proxy votes only if its ranking's Spearman with taylor's is at least this (one that
    #: ranks like noise would make every layer look disputed); -1: every proxy votes.
    min_agreement: float = 0.3


class PerturbationSensitivity(SensitivityCriterion):
    """Layer sensitivity measured: output change with one layer compressed at a time."""

    name = "sensitivity-perturbation"
    criterion = "perturbation"
    Options = PerturbationOptions

    def prepare(self, ir: IR, ctx: PassContext, options: SensitivityOptions,
                layers: list[Layer]) -> int:
        self._ir = ir
        self._batches = calibration_batches(ir, ctx, options.max_batches)
        self._references = [run_graph(ir, batch)[0] for batch in self._batches]
        weights = sorted({layer.weight.name for layer in layers})
        self._runners = [SuffixRunner(ir, batch, weights) for batch in self._batches]
        return len(self._batches)

    def scored_jobs(self, ir: IR, ctx: PassContext, options: SensitivityOptions, kind: str,
                    items: dict[str, list[str]]) -> set[tuple[str, str]] | None:
        """Every (layer or group, setting) (``select=all``); else the layers, or groups, the
        proxies disagree on plus the anchors, at their reference setting (a group's: its
        middle keep ratio; ``measure_settings=all``: at every setting)."""
        assert isinstance(options, PerturbationOptions)
        if not hasattr(self, "_measured"):
            self._measured: dict[str, set[str] | None] = {}
        self._measured[kind] = None
        if options.select == "all":
            return None
        if not hasattr(self, "_proxies"):
            common = {k: getattr(options, k) for k in SensitivityOptions.model_fields}
            self._proxies = {name: _proxy(ir, ctx, name, common) for name in PROXIES}
        curves = {name: _curves(result, kind) for name, result in self._proxies.items()}
        if any(set(items) - set(c) for c in curves.values()):
            return None  # a proxy lacks some group (its groups failed): measure them all
        ref = {n: options.reference if kind == "layers" else keys[len(keys) // 2]
               for n, keys in items.items()}
        scores = voters({p: {n: c[n][ref[n]] for n in items} for p, c in curves.items()},
                        options.min_agreement)
        chosen = set(choose_layers(scores, options.threshold, options.anchors))
        self._measured[kind] = chosen
        if options.measure_settings == "all":
            return {(n, k) for n in chosen for k in items[n]}
        return {(n, ref[n]) for n in chosen}

    def fill_unscored(self, kind: str, measured: dict[str, dict[str, float]],
                      items: dict[str, list[str]]) -> dict[str, dict[str, float]]:
        """Unmeasured values: the taylor curve scaled to the measurements (:mod:`.selective`)."""
        return fill_curves(measured, _curves(self._proxies[ESTIMATOR], kind), items)

    def extra(self, layer: Layer) -> dict[str, float]:
        """``measured``: 1.0 if the layer was measured, 0.0 if scaled from taylor."""
        chosen = getattr(self, "_measured", {}).get("layers")
        return {"measured": float(chosen is None or layer.name in chosen)}

    def damage(self, layer: Layer, weight: torch.Tensor, compressed: torch.Tensor,
               setting: Setting) -> float:
        return measure_output_change(self._ir, self._batches, self._references,
                                     layer.weight.name, layer.stored(compressed),
                                     runners=self._runners)

    def group_damage(self, candidate, key, overrides, layers, weights) -> float:
        """Measured: the graph runs with the group's units zeroed (a block: skipped)."""
        return measure_output_change(self._ir, self._batches, self._references, None,
                                     overrides=overrides, skip_adds=candidate.skip_adds,
                                     runners=self._runners)


def _curves(result, kind: str) -> dict[str, dict[str, float]]:
    found = result.layers if kind == "layers" else result.groups
    return {name: item.curve for name, item in found.items()}


def _proxy(ir: IR, ctx: PassContext, name: str, common: dict):
    """The proxy criterion ``name``'s result with the same settings, from the analysis manager
    when there is one (``slimc analyze`` has usually computed it already)."""
    if ctx.analyses is not None:
        return ctx.analyses.get(f"sensitivity-{name}", **common)
    from slimc.passes.analysis.criteria.hessian import HessianSensitivity
    from slimc.passes.analysis.criteria.magnitude import MagnitudeSensitivity
    from slimc.passes.analysis.criteria.taylor import TaylorSensitivity

    cls = {"magnitude": MagnitudeSensitivity, "taylor": TaylorSensitivity,
           "hessian": HessianSensitivity}[name]
    return cls().run(ir, ctx, cls.Options(**common))
