"""``sensitivity-perturbation``: measured output change when one layer alone is compressed.

No proxy: for each layer and setting, the graph runs on the calibration batches with only that
layer's weight replaced by its compressed version, and the change of the first output is
measured (KL for logits, 1 - cosine for embeddings, relative L2 otherwise; see
:mod:`.divergence`). Prunable groups (heads, neurons, blocks) are measured the same way,
with all their units' slices zeroed at once, or a block's residual adds skipped (see
:mod:`.groups`). It costs one forward pass per (layer or group, setting, batch), which is why it
processes batches of the captured shape and the settings are options.
"""

from __future__ import annotations

import torch
from slimc.passes.analysis.criteria.base import SensitivityCriterion, SensitivityOptions
from slimc.passes.analysis.criteria.candidates import Setting
from slimc.passes.analysis.criteria.divergence import divergence, output_kind
from slimc.passes.analysis.criteria.execution import calibration_batches, run_graph
from slimc.passes.analysis.criteria.groups import run_without_block
from slimc.passes.analysis.layers import Layer

from slimc.ir import IR
from slimc.passmanager import PassContext


def measure_output_change(ir: IR, batches: list[list[torch.Tensor]],
                          references: list[torch.Tensor], weight_name: str | None,
                          compressed: torch.Tensor | None = None, *,
                          overrides: dict[str, torch.Tensor] | None = None,
                          skip_adds: dict[str, int] | None = None) -> float:
    """Mean divergence of the first output over ``batches`` with one weight replaced (or the
    weights in ``overrides``; or, with ``skip_adds``, a residual block removed)."""
    kind = output_kind(ir.output_names[0])
    replaced = dict(overrides or {})
    if weight_name is not None:
        replaced[weight_name] = compressed
    total = 0.0
    for batch, reference in zip(batches, references, strict=True):
        if skip_adds:
            output = run_without_block(ir, batch, skip_adds)[0]
        else:
            output = run_graph(ir, batch, replaced)[0]
        total += divergence(kind, reference, output)
    return total / len(batches)


class PerturbationSensitivity(SensitivityCriterion):
    """Layer sensitivity measured: output change with one layer compressed at a time."""

    name = "sensitivity-perturbation"
    criterion = "perturbation"

    def prepare(self, ir: IR, ctx: PassContext, options: SensitivityOptions,
                layers: list[Layer]) -> int:
        self._ir = ir
        self._batches = calibration_batches(ir, ctx, options.max_batches)
        self._references = [run_graph(ir, batch)[0] for batch in self._batches]
        return len(self._batches)

    def damage(self, layer: Layer, weight: torch.Tensor, compressed: torch.Tensor,
               setting: Setting) -> float:
        return measure_output_change(self._ir, self._batches, self._references,
                                     layer.weight.name, layer.stored(compressed))

    def map_jobs(self, fn, jobs: list) -> list[float]:
        """Every score is forwards on small batches: one job per core, each single-threaded
        (:func:`slimc.jobs.map_single_threaded`; the graph module is stateless, so jobs share
        it)."""
        from slimc.jobs import map_single_threaded

        return map_single_threaded(fn, jobs)

    def group_damage(self, candidate, key, overrides, layers, weights) -> float:
        """Measured: the graph runs with the group's units zeroed (a block: skipped)."""
        return measure_output_change(self._ir, self._batches, self._references, None,
                                     overrides=overrides, skip_adds=candidate.skip_adds)
