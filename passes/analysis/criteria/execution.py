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


class SuffixRunner:
    """Runs an IR's graph on one batch with some weights replaced, from the first op that reads
    a replaced weight on, reusing the unchanged prefix's values from one reference run.

    A perturbed weight in block ``k`` leaves every op before its first use unchanged, so the
    ``perturbation`` criterion's per-layer forwards (one per layer, setting and batch) only need
    the ops from there on: on a 30-block decoder about half the forward on average. The values
    a suffix needs from its prefix (the residual stream, rotary tables, masks: the *frontier*)
    are recorded once per batch; the suffix runs node by node (a :class:`torch.fx.Interpreter`)
    and frees each value after its last use, so its memory is one forward's.
    """

    def __init__(self, ir: IR, inputs: Sequence[torch.Tensor],
                 starts: Iterable[str] | None = None) -> None:
        """``starts``: the weights (placeholder names) whose suffixes will be run (default:
        every weight); their frontiers are recorded from one reference forward now."""
        from torch.fx import Interpreter

        self._ir = ir
        graph = ir.graph_module.graph
        self._nodes = list(graph.nodes)
        index = {node: i for i, node in enumerate(self._nodes)}
        self._index = index
        self._placeholders = {n.name: n for n in self._nodes if n.op == "placeholder"}
        self._values = dict(zip(self._placeholders, graph_values(ir, inputs), strict=True))
        last_use: dict[Node, int] = {}
        for node in self._nodes:
            for used in node.all_input_nodes:
                last_use[used] = index[node]
        self._last_use = last_use
        names = list(starts) if starts is not None else [
            n for n in self._placeholders if n not in self._user_inputs()]
        self._start = {name: self.start_of([name]) for name in names}
        needed: set[Node] = set()
        for start in set(self._start.values()):
            needed |= self._frontier(start)
        self._saved: dict[Node, torch.Tensor] = {}
        interp = Interpreter(ir.graph_module, garbage_collect_values=False)
        env: dict[Node, object] = {}
        with torch.no_grad():
            for node in self._nodes:
                if node.op == "placeholder":
                    env[node] = self._values[node.name]
                elif node.op != "output":
                    interp.env = env
                    env[node] = interp.run_node(node)
                if node in needed:
                    self._saved[node] = env[node]
                for used in node.all_input_nodes:
                    if last_use[used] == index[node] and used.op != "placeholder":
                        env.pop(used, None)

    def _user_inputs(self) -> set[str]:
        return {spec.arg.name for spec in self._ir.program.graph_signature.input_specs
                if spec.kind == InputKind.USER_INPUT}

    def start_of(self, weights: Iterable[str]) -> int:
        """Index of the first node that reads any of ``weights`` (placeholder names)."""
        users = [self._index[u] for w in weights for u in self._placeholders[w].users]
        return min(users, default=len(self._nodes) - 1)

    def _frontier(self, start: int) -> set[Node]:
        """Non-placeholder nodes before ``start`` whose values are used at or after it."""
        return {node for node in self._nodes[:start] if node.op != "placeholder"
                and self._last_use.get(node, -1) >= start}

    def run(self, overrides: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """User outputs with the weights in ``overrides`` (placeholder names) replaced."""
        from torch.fx import Interpreter

        start = self.start_of(overrides)
        frontier = self._frontier(start)
        missing = frontier - self._saved.keys()
        if missing:  # a start nobody asked for at construction: run the whole graph
            return run_graph(self._ir, self._inputs(), overrides)
        interp = Interpreter(self._ir.graph_module, garbage_collect_values=False)
        env: dict[Node, object] = {node: self._saved[node] for node in frontier}
        index, last_use = self._index, self._last_use
        with torch.no_grad():
            for node in self._nodes:
                if node.op == "placeholder":
                    if self._last_use.get(node, -1) >= start:
                        env[node] = overrides.get(node.name, self._values[node.name])
                    continue
                if index[node] < start:
                    continue
                interp.env = env
                if node.op == "output":
                    return user_outputs(self._ir, interp.run_node(node))
                env[node] = interp.run_node(node)
                for used in node.all_input_nodes:
                    if last_use[used] == index[node]:
                        env.pop(used, None)
        raise AssertionError("graph without an output node")

    def _inputs(self) -> list[torch.Tensor]:
        users = self._user_inputs()
        return [v for name, v in self._values.items() if name in users]
