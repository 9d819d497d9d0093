"""Calibration statistics: what each quantizable layer sees as input on real batches.

GPTQ needs each layer's input Hessian ``H = 2/n X^T X``; AWQ needs per-channel mean
``|x|`` and a sample of input rows to score candidate scalings; static int8 activations need
per-channel maxima and a sample of rows to choose the clipping range and SmoothQuant factor.
All of it comes from one run of the IR per batch under :func:`slimc.observe.observe`, recording
the activation entering each layer.

A convolution is a matmul over its im2col rows: each output position reads a row of
``C * prod(kernel)`` inputs (channel-major, the order of the weight matrix ``[O, I/g *
kernel]``), so its statistics are those of the unfolded input, per column, and group ``g``'s
columns are the contiguous block ``[g * K_g, (g + 1) * K_g)``. Its Hessian is kept per group
(``[G, K_g, K_g]``): a grouped convolution's output channels only see their group's columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import Node

from slimc.ir import IR
from slimc.layers import ConvGeometry, conv_geometry
from slimc.observe import observe
from slimc.passmanager import PassContext

from .layers import Layer


@dataclass
class LayerStats:
    """Input statistics of one layer (K = input features)."""

    hessian: torch.Tensor | None = None  # [K, K] (convs: [G, K_g, K_g]), sum of x x^T
    abs_sum: torch.Tensor | None = None  # [K]
    sq_sum: torch.Tensor | None = None  # [K], the diagonal of X^T X
    min: torch.Tensor | None = None  # [K], smallest x seen per input channel
    max: torch.Tensor | None = None  # [K], largest x seen per input channel
    rows: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)

    @property
    def abs_max(self) -> torch.Tensor:
        """[K], largest |x| seen per input channel."""
        return torch.maximum(self.max, -self.min)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)

    def sample_rows(self) -> torch.Tensor:
        return torch.cat(self.sample) if self.sample else torch.zeros(0)


def calibration_batches(ctx: PassContext) -> list[list[torch.Tensor]]:
    """The ``--calib`` batches, or the example inputs when there are none
    (:meth:`PassContext.calibration`)."""
    return ctx.calibration()


def _inputs_of(layer: Layer) -> list[Node]:
    """The activations a layer multiplies (one per distinct input node)."""
    return list(dict.fromkeys(use.node.args[use.input_arg] for use in layer.uses
                              if use.input_arg is not None))


def collect(ir: IR, layers: Sequence[Layer], batches: Sequence[Sequence[torch.Tensor]], *,
            hessian: bool, sample_rows: int = 0,
            tied_heads: bool = False) -> dict[str, LayerStats]:
    """Run ``batches`` through ``ir`` and gather each linear and convolution layer's input
    statistics (convolutions: of the im2col rows, see the module docstring). With
    ``hessian`` or ``tied_heads``, an embedding table tied to an output head gets the head's
    input statistics (its gathers contribute none)."""
    # One activation often feeds several layers (q, k and v read the same hidden states):
    # those layers share one LayerStats. A layer fed by several activations (a weight used
    # twice) gets its own, accumulated over all of them.
    shared: dict[tuple, LayerStats] = {}
    watched: dict[Node, list[tuple[LayerStats, ConvGeometry | None]]] = {}
    stats: dict[str, LayerStats] = {}
    for layer in layers:
        if layer.kind not in ("linear", "conv", "embedding"):
            continue  # statistics are per input feature of a matmul
        if layer.is_embedding and not ((hessian or tied_heads) and layer.linear_nodes):
            # A gather has no input; a table tied to an output head is a matmul there: GPTQ
            # rounds it on that head's input Hessian (the final hidden states), W8A8 sets the
            # head's activation range from them. Not for AWQ, whose scaled columns the
            # gather could not follow.
            continue
        inputs = _inputs_of(layer)
        geometries = [conv_geometry(use.node, layer.shape) if layer.kind == "conv" else None
                      for use in layer.uses]
        if len(inputs) == 1 and len(set(geometries)) == 1:
            stats[layer.name] = shared.setdefault((inputs[0], geometries[0]), LayerStats())
        else:
            stats[layer.name] = LayerStats()
        for use, geometry in zip(layer.uses, geometries, strict=True):
            if use.input_arg is None:
                continue
            node = use.node.args[use.input_arg]
            entry = (stats[layer.name], geometry)
            if not any(st is entry[0] and g == geometry for st, g in watched.get(node, [])):
                watched.setdefault(node, []).append(entry)

    if hessian:  # per-batch [K, K] partials would double the memory: one batch at a time
        def accumulate(n: Node, args: tuple, result) -> None:
            if isinstance(result, torch.Tensor):
                for st, geometry in watched[n]:
                    _accumulate(st, _rows(result, geometry), hessian, sample_rows,
                                geometry.groups if geometry is not None else 0)

        observe(ir, batches, {node: accumulate for node in watched})
    else:
        _collect_in_parallel(ir, batches, watched, sample_rows)
    for st in {id(st): st for st in stats.values()}.values():
        if st.hessian is not None:
            st.hessian *= 2.0 / max(st.rows, 1)
    return stats


def _rows(result: torch.Tensor, geometry: ConvGeometry | None) -> torch.Tensor:
    """The matmul rows ``[R, K]`` of an observed activation (convolutions: im2col)."""
    rows = result.detach() if geometry is None else im2col(result.detach(), geometry)
    return rows.reshape(-1, rows.shape[-1]).float()


def _collect_in_parallel(ir: IR, batches: Sequence[Sequence[torch.Tensor]],
                         watched: dict[Node, list[tuple[LayerStats, ConvGeometry | None]]],
                         sample_rows: int) -> None:
    """The statistics of ``watched`` without Hessians, one calibration batch per core.

    Each worker runs one batch forward with single-threaded ops and reduces what each layer
    saw (:func:`_reduce`); the partial results are merged in batch order, in the order the
    sequential loop would have added them, so the statistics are the ones it gives. Batches
    go in waves of one per worker, and a wave keeps a batch's rows only for the layers whose
    sample is not full yet. That is every layer in the first wave: one batch's rows of every
    watched layer per core (im2col rows for convolutions, ~kernel-area times the activation),
    held until the wave is merged -- more than the sequential loop's one layer at a time.
    Slicing the sample in the worker would bound it but change which rows the sample keeps.
    """
    from slimc.jobs import map_single_threaded

    def one_batch(item: tuple[Sequence[torch.Tensor], set[int]]) -> list[tuple[LayerStats,
                                                                                  dict]]:
        batch, wants_rows = item
        parts: list[tuple[LayerStats, dict]] = []

        def record(n: Node, args: tuple, result) -> None:
            if isinstance(result, torch.Tensor):
                for st, geometry in watched[n]:
                    x = _rows(result, geometry)
                    parts.append((st, _reduce(x, keep_rows=id(st) in wants_rows)))

        observe(ir, [batch], {node: record for node in watched})
        return parts

    wave = max(1, torch.get_num_threads())
    everyone = {id(st): st for entries in watched.values() for st, _ in entries}
    for start in range(0, len(batches), wave):
        wants_rows = {key for key, st in everyone.items()
                      if sum(s.shape[0] for s in st.sample) < sample_rows}
        done = map_single_threaded(one_batch, [(b, wants_rows)
                                               for b in batches[start:start + wave]])
        for parts in done:
            for st, part in parts:
                _merge(st, part, sample_rows)


def _reduce(x: torch.Tensor, keep_rows: bool) -> dict:
    """One batch's contribution to a layer's statistics (rows ``x [R, K]``, no Hessian)."""
    return {"abs_sum": x.abs().sum(0), "min": x.amin(0), "max": x.amax(0),
            "sq_sum": x.pow(2).sum(0), "rows": x.shape[0], "x": x if keep_rows else None}


def _merge(st: LayerStats, part: dict, sample_rows: int) -> None:
    """Add one batch's :func:`_reduce` to ``st``, as :func:`_accumulate` adds its rows."""
    st.abs_sum = part["abs_sum"] if st.abs_sum is None else st.abs_sum + part["abs_sum"]
    st.min = part["min"] if st.min is None else torch.minimum(st.min, part["min"])
    st.max = part["max"] if st.max is None else torch.maximum(st.max, part["max"])
    st.sq_sum = part["sq_sum"] if st.sq_sum is None else st.sq_sum + part["sq_sum"]
    have = sum(s.shape[0] for s in st.sample)
    if have < sample_rows:
        x = part["x"]
        step = max(1, x.shape[0] // (sample_rows - have))
        st.sample.append(x[::step][: sample_rows - have].clone())
    st.rows += part["rows"]


def im2col(x: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """The rows ``[N * positions, C * prod(kernel)]`` a convolution multiplies its weight
    matrix with (columns channel-major, as ``Layer.matrix`` flattens ``[O, I/g, *kernel]``)."""
    x = x.float()
    kernel, stride, dilation = geometry.kernel, geometry.stride, geometry.dilation
    pads = geometry.padding
    if len(kernel) == 1:  # 1-D: a 2-D convolution of height 1
        x, kernel, stride, dilation = x.unsqueeze(2), (1, *kernel), (1, *stride), (1, *dilation)
        pads = (0, 0, *pads)
    x = F.pad(x, [pads[2], pads[3], pads[0], pads[1]])
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [N, C * k, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _accumulate(st: LayerStats, x: torch.Tensor, hessian: bool, sample_rows: int,
                groups: int = 0) -> None:
    """Add rows ``x [..., K]``; ``groups`` > 0: a convolution's im2col rows (the Hessian per
    group)."""
    x = x.reshape(-1, x.shape[-1]).float()
    if hessian:
        if groups:
            per_group = x.reshape(x.shape[0], groups, -1).transpose(0, 1)  # [G, R, K_g]
            h = per_group.transpose(1, 2) @ per_group
        else:
            h = x.t() @ x
        st.hessian = h if st.hessian is None else st.hessian + h
    a = x.abs().sum(0)
    st.abs_sum = a if st.abs_sum is None else st.abs_sum + a
    lo, hi = x.amin(0), x.amax(0)
    st.min = lo if st.min is None else torch.minimum(st.min, lo)
    st.max = hi if st.max is None else torch.maximum(st.max, hi)
    q = x.pow(2).sum(0)
    st.sq_sum = q if st.sq_sum is None else st.sq_sum + q
    st.rows += x.shape[0]
    have = sum(s.shape[0] for s in st.sample)
    if have < sample_rows:
        step = max(1, x.shape[0] // (sample_rows - have))
        st.sample.append(x[::step][: sample_rows - have].clone())
