"""Calibration statistics: what each quantizable layer sees as input on real batches.

GPTQ needs each layer's input Hessian ``H = 2/n X^T X``; AWQ needs per-channel mean
``|x|`` and a sample of input rows to score candidate scalings. Both come from one run of the
IR per batch with an ``fx.Interpreter`` that records the activation entering each layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.export.graph_signature import InputKind
from torch.fx import Interpreter, Node

from slimc.ir import IR
from slimc.passmanager import PassContext

from .layers import Layer

aten = torch.ops.aten


@dataclass
class LayerStats:
    """Input statistics of one layer (K = input features)."""

    hessian: torch.Tensor | None = None  # [K, K], sum of x x^T (scaled at the end)
    abs_sum: torch.Tensor | None = None  # [K]
    sq_sum: torch.Tensor | None = None  # [K], the diagonal of X^T X
    rows: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)

    def sample_rows(self) -> torch.Tensor:
        return torch.cat(self.sample) if self.sample else torch.zeros(0)


def calibration_batches(ctx: PassContext) -> list[list[torch.Tensor]]:
    """The ``--calib`` batches, or the example inputs when there are none
    (:meth:`PassContext.calibration`)."""
    return ctx.calibration()


def _input_of(node: Node) -> Node:
    return node.args[1] if node.target is aten.addmm.default else node.args[0]


def collect(ir: IR, layers: Sequence[Layer], batches: Sequence[Sequence[torch.Tensor]], *,
            hessian: bool, sample_rows: int = 0) -> dict[str, LayerStats]:
    """Run ``batches`` through ``ir`` and gather each linear layer's input statistics."""
    watched: dict[Node, str] = {}
    for layer in layers:
        if not layer.is_embedding:
            for node in layer.linear_nodes:
                watched[_input_of(node)] = layer.name
    stats = {layer.name: LayerStats() for layer in layers if not layer.is_embedding}

    class Recorder(Interpreter):
        def run_node(self, n: Node):
            result = super().run_node(n)
            name = watched.get(n)
            if name is not None and isinstance(result, torch.Tensor):
                _accumulate(stats[name], result.detach(), hessian, sample_rows)
            return result

    recorder = Recorder(ir.graph_module)
    with torch.no_grad():
        for batch in batches:
            user = iter(batch)
            values = [next(user) if s.kind == InputKind.USER_INPUT else ir._state_value(s)
                      for s in ir.program.graph_signature.input_specs]
            recorder.run(*values)
    for st in stats.values():
        if st.hessian is not None:
            st.hessian *= 2.0 / max(st.rows, 1)
    return stats


def _accumulate(st: LayerStats, x: torch.Tensor, hessian: bool, sample_rows: int) -> None:
    x = x.reshape(-1, x.shape[-1]).float()
    if hessian:
        h = x.t() @ x
        st.hessian = h if st.hessian is None else st.hessian + h
    a = x.abs().sum(0)
    st.abs_sum = a if st.abs_sum is None else st.abs_sum + a
    q = x.pow(2).sum(0)
    st.sq_sum = q if st.sq_sum is None else st.sq_sum + q
    st.rows += x.shape[0]
    have = sum(s.shape[0] for s in st.sample)
    if have < sample_rows:
        step = max(1, x.shape[0] // (sample_rows - have))
        st.sample.append(x[::step][: sample_rows - have].clone())
