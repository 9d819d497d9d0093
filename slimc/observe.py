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
