"""Running an IR's graph on calibration batches with substituted, or differentiable, weights.

Analyses must not edit the IR, so instead of ``set_weight`` they call the exported graph module
directly with a different tensor in one weight's placeholder slot. The same path runs with
weights that require grad, for gradient and Hessian criteria, and under an
:class:`ActivationRecorder` (on :func:`slimc.observe.observe`) that records the inputs each
layer sees.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch.export.graph_signature import InputKind
from torch.fx import Node

from slimc.ir import IR
from slimc.observe import observe
from slimc.passmanager import PassContext

Batch = list[torch.Tensor]


def calibration_batches(ir: IR, ctx: PassContext, max_batches: int | None = None) -> list[Batch]:
    """The ``--calib`` batches, else the example inputs (:meth:`PassContext.calibration`)."""
    batches = ctx.calibration(max_batches)
    if not batches or not batches[0]:
        raise ValueError("the analysis needs example or calibration inputs in the PassContext")
    return batches


def graph_values(ir: IR, inputs: Sequence[torch.Tensor],
                 overrides: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Positional arguments of ``ir.graph_module``: weights (or ``overrides`` by placeholder
    name) and user inputs, in placeholder order."""
    overrides = overrides or {}
    weights = ir.weights()
    user = iter(inputs)
    values = []
    for spec in ir.program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            values.append(next(user))
        else:
            values.append(overrides.get(spec.arg.name, weights[spec.arg.name]))
    return values


def user_outputs(ir: IR, flat) -> list[torch.Tensor]:
    flat = flat if isinstance(flat, (tuple, list)) else (flat,)
    return [flat[i] for i in ir._user_output_positions()]


def run_graph(ir: IR, inputs: Sequence[torch.Tensor],
              overrides: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """User outputs of the graph with some weights replaced (no autograd)."""
    with torch.no_grad():
        return user_outputs(ir, ir.graph_module(*graph_values(ir, inputs, overrides)))


def differentiable_weights(ir: IR, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Fresh leaf copies of the named weights that require grad."""
    weights = ir.weights()
    return {n: weights[n].detach().clone().requires_grad_(True) for n in names}


def run_with_grad(ir: IR, inputs: Sequence[torch.Tensor],
                  leaves: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """User outputs as a differentiable function of ``leaves``."""
    with torch.enable_grad():
        return user_outputs(ir, ir.graph_module(*graph_values(ir, inputs, leaves)))


class ActivationRecorder:
    """Accumulates, per watched op node, the squared L2 norm of each input feature.

    Linear: per input feature over all tokens; convolution: per input channel over batch and
    space; embedding: how often each row is gathered (the squared norm of a one-hot input).
    Runs on :func:`slimc.observe.observe`.
    """

    def __init__(self, ir: IR, watch: Iterable[Node],
                 inputs: Mapping[str, tuple[int | None, int]] | None = None) -> None:
        """``inputs``: per op name, (argument index of the activation, its feature axis), as
        :class:`slimc.layers.Use` gives them; default: argument 0, axis 1 for convolutions
        and -1 otherwise."""
        self._ir = ir
        self._watch = {n.name: n for n in watch}
        self._inputs = dict(inputs or {})
        self.sq_norms: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def _record(self, node: Node, args, result=None) -> None:
        from slimc.passes.analysis.layers import op_name

        op = op_name(node)
        if op == "aten.embedding":
            weight, indices = args[0], args[1]
            sq = torch.bincount(indices.reshape(-1), minlength=weight.shape[0]).double()
            count = indices.numel()
        else:
            index, axis = self._inputs.get(node.name, (0, 1 if "conv" in op else -1))
            x = args[index or 0].detach().double().movedim(axis, -1)
            sq = x.pow(2).reshape(-1, x.shape[-1]).sum(0)
            count = x.numel() // x.shape[-1]
        self.sq_norms[node.name] = self.sq_norms.get(node.name, 0) + sq
        self.tokens[node.name] = self.tokens.get(node.name, 0) + count

    def record(self, inputs: Sequence[torch.Tensor]) -> None:
        observe(self._ir, [inputs], {name: self._record for name in self._watch})
