"""Run an IR on calibration batches with observers: the one way passes record activations.

Calibration-aware passes (GPTQ/AWQ statistics, Wanda-style importance, whitened low-rank
factorization) need what flows into or out of particular nodes on real data. Each used to
subclass ``torch.fx.Interpreter`` for that; :func:`observe` is that loop once. An observer is a
callable ``(node, args, result)`` attached to a node (by node or name): ``args`` are the node's
evaluated positional arguments (so ``args[0]`` is a linear's input), ``result`` its value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.export.graph_signature import InputKind
from torch.fx import Interpreter, Node

from slimc.ir import IR

Observer = Callable[[Node, tuple, Any], None]


def graph_values(ir: IR, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The flat argument list of ``ir.graph_module``: weights in signature order, user
    inputs where the signature has them."""
    values, user = [], iter(inputs)
    for spec in ir.program.graph_signature.input_specs:
        values.append(next(user) if spec.kind == InputKind.USER_INPUT
                      else ir._state_value(spec))  # noqa: SLF001 - the IR's own accessor
    return values


class _Observed(Interpreter):
    def __init__(self, ir: IR, observers: Mapping[str, list[Observer]]) -> None:
        super().__init__(ir.graph_module)
        self._observers = observers

    def run_node(self, n: Node) -> Any:
        result = super().run_node(n)
        watchers = self._observers.get(n.name)
        if watchers:
            args = self.fetch_args_kwargs_from_env(n)[0]
            for fn in watchers:
                fn(n, args, result)
        return result


def observe(ir: IR, batches: Iterable[Sequence[torch.Tensor]],
            observers: Mapping[Node | str, Observer | Sequence[Observer]]) -> None:
    """Run every batch (user inputs in IR order) through ``ir`` under ``torch.no_grad``,
    calling each node's observers as it is computed."""
    table: dict[str, list[Observer]] = {}
    for key, fns in observers.items():
        name = key.name if isinstance(key, Node) else key
        table.setdefault(name, []).extend([fns] if callable(fns) else list(fns))
    runner = _Observed(ir, table)
    with torch.no_grad():
        for batch in batches:
            runner.run(*graph_values(ir, batch))


class StagedRun:
    """Calibration batches advanced through the graph in stages, with the values crossing the
    current cut kept per batch: a pass that compresses the layers it has just measured before
    measuring the next ones (GPTQ's and SVD-LLM's *sequential* calibration: each layer sees the
    activations of the already-compressed layers before it) costs one forward pass in all,
    not one per stage.

    Edits to the graph must happen after the cut (nodes not yet run), which is where the
    layers reading the values just measured are. ``advance_to(node)`` runs every batch up to
    and including ``node`` and returns its value per batch."""

    def __init__(self, ir: IR, batches: Iterable[Sequence[torch.Tensor]]) -> None:
        self.ir = ir
        self._runner = Interpreter(ir.graph_module)
        self._envs: list[dict[Node, Any]] = []
        placeholders = [n for n in ir.graph.nodes if n.op == "placeholder"]
        for batch in batches:
            self._envs.append(dict(zip(placeholders, graph_values(ir, batch), strict=True)))
        self._last: Node | None = placeholders[-1] if placeholders else None

    def advance_to(self, target: Node) -> list[Any]:
        """Run each batch from the current cut through ``target``; a value still live (a
        graph input, a node before the cut that later nodes read) is returned as it is."""
        if self._envs and target in self._envs[0]:
            return [env[target] for env in self._envs]
        todo = []
        node = self._last.next if self._last is not None else next(iter(self.ir.graph.nodes))
        while True:
            if node.op == "output":
                raise ValueError(f"{target.name} is not after the current cut")
            todo.append(node)
            if node is target:
                break
            node = node.next
        ran = set()
        for n in self.ir.graph.nodes:
            ran.add(n)
            if n is self._last:
                break
        ran.update(todo)
        # weights a transform added since the last stage (factors of the layers just edited)
        added = {n: self.ir.get_weight(n) for n in self.ir.graph.nodes
                 if n.op == "placeholder" and self._envs and n not in self._envs[0]}
        for env in self._envs:
            env.update(added)
        with torch.no_grad():
            for env in self._envs:
                self._runner.env = env
                for n in todo:
                    env[n] = self._runner.run_node(n)
        values = [env[target] for env in self._envs]
        for env in self._envs:  # drop values nothing after the cut reads any more
            for n in [n for n in env if n.op != "placeholder"]:
                if all(u in ran for u in n.users):
                    del env[n]
        self._last = target
        return values

    def value(self, node: Node) -> list[Any]:
        """``node``'s value per batch (it must have run and still be live)."""
        return [env[node] for env in self._envs]
