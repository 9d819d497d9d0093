"""Each layer's choices for the budget search, what each costs on the target, and what each
damages (measured).

A choice (:class:`Option`) is a storage format (``fp32``, ``int8``, ``int4-g128`` ... any
:func:`~slimc.passes.quantize.formats.parse_format` name, so a new low-bit format joins by
being listed in :class:`Techniques`) optionally applied to the two factors of a low-rank
factorization that keeps a share ``keep`` of the layer's parameters. Pruning changes shapes
across layers (an FFN's channels, a head's projections), so it is not a per-layer choice here:
the search prunes the whole IR first (:class:`Techniques.prune_ratios`) and builds a space per
pruned IR.

Damage is the same measure as the ``sensitivity`` analysis's ``perturbation`` criterion (KL of
the softmax for logits, 1 - cosine for embeddings, relative L2 otherwise) with only that layer
changed, on calibration batches. It is obtained for every (layer, choice), combinations
included (low-rank factors then quantized), because a precision curve and a rank curve do not
add up to the damage of both together: from each choice's local output error scaled by
end-to-end anchors per layer (:mod:`.damage`), or measured end to end for every entry.
The costs are exact for bytes and parameters (the formats' own byte counts, scales and zero
points included) and the cost model's roofline for
latency (:mod:`slimc.passes.analysis.cost`: ``max(FLOPs / peak, bytes / bandwidth) + per-op
overhead`` with the target's hardware numbers).
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from slimc.ir import IR, hinted_numel
from slimc.jobs import map_single_threaded
from slimc.layers import Layer
from slimc.memory import trim_heap
from slimc.passes.analysis.criteria.divergence import divergence_from, output_kind
from slimc.passes.analysis.criteria.execution import (
    SuffixRunner,
    calibration_batches,
    run_graph,
)
from slimc.passes.lowrank import factorize
from slimc.passes.lowrank.lowrank import default_round_to, spectra
from slimc.passes.lowrank.rewrite import is_factor
from slimc.passes.lowrank.rewrite import weight_layers as factorizable_layers
from slimc.passes.quantize.formats import Format, fake_quantize, fake_quantize_rows, parse_format
from slimc.passes.quantize.layers import plan, takes_int8_activations
from slimc.passmanager import PassContext

from .damage import (
    anchor_indices,
    collect,
    depth_shared,
    fit_line,
    from_line,
    interpolate,
    local_error,
    local_measurable,
)

#: The formats of the ``precision`` technique set (``-O2``): every int4 variant and int8.
PRECISION_FORMATS = ("int8", "int4-g128", "int4-g32", "int4-g32-fz", "int4-g64-fz",
                     "int4-g128-fz")


@dataclass(frozen=True)
class Techniques:
    """What the search may choose from. New choices (a lower-bit format, a recovery step)
    are added here and in :class:`Option`; the solver and the back-off need no change."""

    #: int3/int2 (bit-packed, fp16 scale + minimum per group: 3.25-3.5 and 2.5 bits per
    #: weight) make budgets below int4-g128's 4.3 bits reachable without low rank.
    #: int4-gG-fz (fp16 scale and minimum per group, 5 / 4.5 / 4.25 bits at G = 32 / 64 /
    #: 128): GGUF Q4_1's layout, exact at G = 32 for weights that came from a Q4_1 file, and
    #: between int4-g32 and int3-g64 in bytes otherwise.
    #: The ``-qs`` formats (coded group scales, issue 17) are not here: see
    #: :data:`CODED_FORMATS`, added only for size budgets that need them.
    formats: tuple[str, ...] = ("int8", "int4-g128", "int4-g32", "int4-g32-fz", "int4-g64-fz",
                                "int4-g128-fz", "int3-g64", "int3-g128", "int2-g64")
    #: Low-rank: shares of a layer's parameters the two factors keep (empty: no low-rank).
    lowrank_keeps: tuple[float, ...] = ()
    #: Formats of the two factors (fp32 factors are rarely worth their bytes; each extra
    #: choice costs one measured forward per layer).
    lowrank_formats: tuple[str, ...] = ("int8", "int4-g128")
    lowrank_method: str = "whiten"
    #: Structured pruning ratios tried for the whole IR (0.0: no pruning).
    prune_ratios: tuple[float, ...] = (0.0,)
    #: How candidates round their weights (``quantize{method}``): ``gptq`` when the user gave
    #: calibration data (:func:`slimc.search.driver`): at 3 bits it pushes each column's
    #: rounding error onto the columns not yet rounded, through the inputs' Hessian; on the
    #: example input alone (random tokens) that Hessian would fit noise, so RTN then.
    quantize_method: str = "rtn"
    #: With ``gptq``: quantize columns in decreasing Hessian-diagonal order, every group's grid
    #: fixed from the original weights (``quantize{act_order=true}``; same bytes and layout).
    #: Measured on MiniLM / WordSim-353 (docs/benchmarks.md, wt/search20): the same bytes with
    #: less held-out output error at every format (int2-g64: Spearman 0.124 -> 0.652) for
    #: ~1.1-1.2x the seconds of the GPTQ solve itself; per-layer output error 0.68x median on
    #: SmolLM2 (wt/smol19).
    act_order: bool = False
    #: Also build and measure uniform W8A8 (``quantize{weights=int8,activations=int8}``:
    #: static int8 inputs on the target's int8 dot-product kernels). Set when the user gave
    #: calibration data (the activation scales are calibrated on it): on compute-bound matmuls
    #: it is the only format that makes arithmetic cheaper (MiniLM on the host: 0.45x fp32
    #: with no loss on WordSim-353, docs/benchmarks.md), which weight-only formats never do.
    w8a8: bool = False

    @classmethod
    def named(cls, name: str) -> Techniques:
        if name == "precision":
            # -O2 and ``explore --precision-only``: per-layer int8/int4/fp32, as the level
            # says. int3/int2 are for budgets below int4's bytes (``-Os``, ``--budget``):
            # SmolLM2's -O2 candidates that held its 1% had none, yet their grid searches
            # and fake quantization were a quarter of its damage table (issue 18,
            # docs/benchmarks.md "Eighth round").
            return cls(formats=PRECISION_FORMATS)
        if name == "all":
            return cls(lowrank_keeps=(0.5, 0.25), prune_ratios=(0.0, 0.2))
        raise ValueError(f"unknown technique set {name!r}")

    @classmethod
    def for_context(cls, name: str, ctx: PassContext) -> Techniques:
        """The named set, with GPTQ rounding when ``ctx`` holds real calibration data
        (``--calib``): SmolLM2 at 3.5-4.25 bits per weight lost far less with it
        (docs/benchmarks.md, issue 17), and with act-order (see :attr:`act_order`)."""
        techniques = cls.named(name)
        if ctx.calibration_batches:
            techniques = replace(techniques, quantize_method="gptq", act_order=True,
                                 w8a8=True)
        return techniques

    def for_size(self, size: float | None, ctx: PassContext) -> Techniques:
        """These techniques with :data:`CODED_FORMATS` added when ``size`` (a ``--budget``
        share of fp32 bytes) is below :data:`CODED_BELOW` and the target has ``-qs`` kernels
        (``"qs"`` in its :attr:`~slimc.backend.TargetInfo.formats`; GPU targets have none)."""
        if size is None or size >= CODED_BELOW:
            return self
        from slimc.passes.analysis.target_info import target_info

        if "qs" not in target_info(ctx.target).formats:
            return self
        extra = tuple(f for f in CODED_FORMATS if f not in self.formats)
        return replace(self, formats=self.formats + extra)


#: Formats with coded group scales (:mod:`slimc.coded_scales`) the budget search adds below
#: :data:`CODED_BELOW`: ``int4-g32-qs`` (4.5 + 32/K bits per weight: int4-g32's grid for
#: 0.5 bit less than ``-fz``) and ``int3-g32-qs5`` (3.31 + 32/K, a g32 int3 grid for less
#: than ``int3-g64``'s 3.5): SmolLM2's 1.129x perplexity at size 0.1298 in the harness
#: combined exactly these (attention / down_proj int4, gate / up int3, docs/benchmarks.md
#: wt/smol23). Not in -O2's precision set and not for larger budgets: each format is one
#: more measured forward per layer in the damage table (docs/benchmarks.md, wt/qs24).
CODED_FORMATS = ("int4-g32-qs", "int3-g32-qs5")
#: Size budgets (share of fp32 bytes) below which :data:`CODED_FORMATS` join the search:
#: ``int4-g32-fz``'s 5 bits per weight, the smallest grouped-int4 grid without them.
CODED_BELOW = 5.0 / 32.0


@dataclass(frozen=True)
class Option:
    """One layer's choice: ``fmt`` for the weight, or for both factors when ``rank``."""

    fmt: Format
    rank: int | None = None
    keep: float | None = None

    def __str__(self) -> str:
        return f"rank{self.rank}+{self.fmt}" if self.rank else str(self.fmt)


FP32 = Format("fp32")


@dataclass
class LayerChoices:
    layer: Layer
    shape: tuple[int, int]
    options: list[Option]
    #: (uses as a gather: rows gathered, uses as a matmul: rows multiplied) per run.
    gathers: int = 0
    rows: int = 0


@dataclass
class Space:
    """The choices of every layer of one IR with their cost and damage tables
    (``[layer, option]``, options padded with ``inf`` damage / cost)."""

    layers: list[LayerChoices]
    damage: np.ndarray
    costs: dict[str, np.ndarray]
    #: Cost of what no choice changes (norms, biases, attention matmuls ...), per budget key.
    rest: dict[str, float]
    hardware: dict | None
    info: dict = field(default_factory=dict)

    def totals(self, picks: Sequence[int]) -> dict[str, float]:
        return {k: self.rest[k] + float(sum(t[i, j] for i, j in enumerate(picks)))
                for k, t in self.costs.items()}


def _latency(hw, flops: float, moved: float, ops: int, peak: float | None = None) -> float:
    """The cost analysis's roofline for one op (fp32 arithmetic: weight-only formats
    dequantize into fp32 kernels; ``peak``: another rate, the W8A8 int8 one)."""
    return max(flops / (peak or hw.peak_flops("float32")), moved / hw.bandwidth) \
        + ops * hw.op_overhead_us * 1e-6


def _use_rows(layer: Layer, n: int, k: int) -> tuple[int, int]:
    """(gathered rows, multiplied rows) per run, from the ops' output shapes."""
    gathers = rows = 0
    for use in layer.uses:
        val = use.node.meta.get("val")
        numel = hinted_numel(val) if isinstance(val, torch.Tensor) else 0
        if use.role == "embedding":
            gathers += numel // max(k, 1)
        else:
            rows += numel // max(n, 1)
    return gathers, rows


def option_costs(choice: LayerChoices, option: Option, hw,
                 int8_peak: float | None = None) -> dict[str, float]:
    """Bytes, parameters and roofline latency of one layer under ``option``; ``int8_peak``
    (op/s): the layer's matmul takes int8 inputs too (W8A8, an unfactored int8 linear,
    convolution or tied output head; gathers stay weight-only) and runs at that rate
    (:func:`slimc.passes.analysis.cost.int8_peak`)."""
    n, k = choice.shape
    fmt, r = option.fmt, option.rank
    if r:
        nbytes = fmt.nbytes(n, r) + fmt.nbytes(r, k) if not choice.layer.is_embedding \
            else fmt.nbytes(n, r) + fmt.nbytes(k, r)
        params = r * (n + k)
    else:
        nbytes, params = fmt.nbytes(n, k), n * k
    out = {"size": nbytes, "params": float(params)}
    if hw is not None:
        bpw = nbytes / max(params, 1)  # bytes per stored weight
        t = 0.0
        if choice.gathers:  # a gather reads one row per index (then r x K more with factors)
            width = r or k
            t += _latency(hw, 2.0 * choice.gathers * r * k if r else 0.0,
                          choice.gathers * width * (bpw + 4) + (r * k * bpw if r else 0), 2 if r
                          else 1)
        if choice.rows:
            if r:
                t += _latency(hw, 2.0 * choice.rows * r * (n + k),
                              nbytes + 4.0 * choice.rows * (n + k + 2 * r), 2)
            else:
                w8a8 = int8_peak is not None and option.fmt.kind == "int8" \
                    and takes_int8_activations(choice.layer)
                if w8a8:  # 1-byte codes in, written by their own quantize kernel
                    from slimc.passes.analysis.cost import activation_quantize_seconds

                    t += _latency(hw, 2.0 * choice.rows * n * k,
                                  nbytes + choice.rows * (k + 4.0 * n), 1, int8_peak) \
                        + activation_quantize_seconds(hw, choice.rows * k)
                else:
                    t += _latency(hw, 2.0 * choice.rows * n * k,
                                  nbytes + 4.0 * choice.rows * (n + k), 1)
        out["latency"] = t
    return out


def build_space(ir: IR, ctx: PassContext, techniques: Techniques, hw,
                max_batches: int = 2, damage_method: str = "local",
                measure_damage: bool = True) -> Space:
    """Options, costs and measured damage for every quantizable layer of ``ir``.

    ``measure_damage=False``: zero damage for every option (costs only, seconds instead of
    the damage table's minutes), to tell whether a budget is reachable at all."""
    layers, _ = plan(ir)
    formats = [FP32] + [parse_format(f) for f in techniques.formats]
    factorizable = {la.weight_node.name for la in factorizable_layers(ir, embeddings=True)
                    if not is_factor(la)}
    round_to = default_round_to(ctx) if techniques.lowrank_keeps else 8
    spectrum = {}
    if techniques.lowrank_keeps:
        candidates = [la for la in layers if la.weight_node.name in factorizable]
        spectrum = spectra(ir, candidates, ctx, techniques.lowrank_method, 0.5, {})
    choices: list[LayerChoices] = []
    for layer in layers:
        n, k = (int(d) for d in layer.matrix(ir).shape)
        gathers, rows = _use_rows(layer, n, k)
        options: list[Option] = []
        for fmt in formats:
            if fmt.kind == "int4" and layer.is_embedding and k % 2:
                continue  # quantize stores odd-width int4 tables as int8
            if (fmt.lowbit or fmt.coded_scales) and layer.kind in ("conv", "expert"):
                continue  # int3/int2 and -qs grids exist for linears and gathers only
            options.append(Option(fmt))
        if layer.name in spectrum:
            for keep in techniques.lowrank_keeps:
                r = factorize.rank_for_ratio(n, k, keep, round_to)
                if r < round_to or r * (n + k) >= n * k:
                    continue
                options += [Option(parse_format(f), r, keep)
                            for f in techniques.lowrank_formats]
        choices.append(LayerChoices(layer, (n, k), options, gathers, rows))
    width = max((len(c.options) for c in choices), default=1)
    costs, rest = cost_tables(ir, ctx, choices, width, hw)
    info = {"round_to": round_to, "layers": len(choices),
            "options": int(sum(len(c.options) for c in choices)),
            "lowrank_method": techniques.lowrank_method}
    damage = measure(ir, ctx, choices, spectrum, width, max_batches, damage_method, info=info) \
        if measure_damage else np.where(np.isfinite(costs["size"]), 0.0, np.inf)
    space = Space(choices, damage, costs, rest, hw.to_json() if hw is not None else None, info)
    space.info["fp32"] = space.totals([0] * len(choices))
    return space


def recost(space: Space, ir: IR, ctx: PassContext, hw) -> Space:
    """The same choices and measured damage priced on another target (``ctx.target``,
    ``hw``): damage does not depend on the target, costs do."""
    width = space.damage.shape[1]
    costs, rest = cost_tables(ir, ctx, space.layers, width, hw)
    other = Space(space.layers, space.damage, costs, rest,
                  hw.to_json() if hw is not None else None, dict(space.info))
    other.info["fp32"] = other.totals([0] * len(space.layers))
    return other


def cost_tables(ir: IR, ctx: PassContext, choices: list[LayerChoices], width: int,
                hw) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """``[layer, option]`` tables of bytes, parameters and latency, and the rest's costs."""
    keys = ["size", "params"] + (["latency"] if hw is not None else [])
    costs = {key: np.full((len(choices), width), np.inf) for key in keys}
    for i, c in enumerate(choices):
        for j, option in enumerate(c.options):
            for key, value in option_costs(c, option, hw).items():
                costs[key][i, j] = value
    rest = {"size": float(ir.weight_bytes()) - float(costs["size"][:, 0].sum()),
            "params": float(ir.num_params()) - float(costs["params"][:, 0].sum())}
    if hw is not None:
        total = float(ctx.analyses.get("cost").total.get("latency_s", 0.0)) \
            if ctx.analyses is not None else 0.0
        rest["latency"] = max(total - float(costs["latency"][:, 0].sum()), 0.0)
    return costs, rest


@torch.no_grad()
def approximate_matrix(ir: IR, choice: LayerChoices, option: Option,
                       spectrum) -> torch.Tensor:
    """The layer's ``[rows, reduction]`` matrix after ``option`` (what the passes compute)."""
    layer = choice.layer
    if option.rank:
        u, v = spectrum.factors(option.rank)
        if layer.is_embedding:  # table u [V, r] per row; v.T [K, r] is a linear's weight
            return fake_quantize(u, option.fmt) @ fake_quantize(v.t().contiguous(),
                                                                option.fmt).t()
        return fake_quantize(u, option.fmt) @ fake_quantize(v, option.fmt)
    return fake_quantize_rows(layer.matrix(ir), option.fmt)


@torch.no_grad()
def approximate(ir: IR, choice: LayerChoices, option: Option, spectrum) -> torch.Tensor:
    """The stored weight ``option`` turns the layer into (what the passes will compute)."""
    stored = ir.get_weight(choice.layer.weight_node)
    return choice.layer.from_matrix(approximate_matrix(ir, choice, option, spectrum)) \
        .to(stored.dtype)


#: How the damage table is measured: ``local`` (default: local output error per choice, a
#: per-layer propagation factor from end-to-end anchors; :mod:`.damage`) or ``end-to-end``
#: (one whole-model forward per layer x choice x batch, the reference it is checked against).
DAMAGE_METHODS = ("local", "end-to-end")
#: The damage table gives freed memory back to the OS after making about this many bytes of
#: approximations (a trim costs page faults on the next allocations: not after every layer).
TRIM_AFTER_BYTES = 256 << 20
#: A layer's approximations up to this many bytes (all its choices together) are kept for its
#: anchors' forwards instead of being made again.
KEEP_APPROXIMATIONS_BYTES = 64 << 20


#: A layer's anchors are run as one batch (:func:`run_stacked`) when its approximations are
#: kept anyway or its anchors' values together are at most this many bytes (they are alive
#: at once, twice while stacked: an embedding table's two would add ~800 MB to the peak on
#: the 320M random Llama, for ~2% of the anchors' forwards; a 2816 x 1024 MLP weight's 23 MB).
STACK_ANCHORS_BYTES = 32 << 20


_QUIET_LOCK = threading.Lock()
_QUIET_USERS = [0]


@contextlib.contextmanager
def _quiet_vmap_fallback():
    """Silence torch's C++ "performance drop" warning while any thread is inside
    :func:`run_stacked` (an op without a batching rule, CPU flash attention, runs once per
    value inside vmap; the warning would reach -O2's console). The switch is process-wide, so
    it is counted: the last thread out turns it back on, not the first (the damage table runs
    layers on a thread pool)."""
    with _QUIET_LOCK:
        _QUIET_USERS[0] += 1
        torch._C._functorch._set_vmap_fallback_warning_enabled(False)
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET_USERS[0] -= 1
            if _QUIET_USERS[0] == 0:
                torch._C._functorch._set_vmap_fallback_warning_enabled(True)


def run_stacked(run, name: str, values: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``[run({name: v}) for v in values]`` as one forward over the stacked values
    (``torch.vmap``): a weight's anchors share every op from its first use on, and the
    matrix products after it run with ``len(values)`` times the rows (the suffix forwards
    are ~93% ``mm`` at 64 tokens: one batch of two is ~14% cheaper per anchor than two,
    issue 18). The outputs equal the separate forwards' up to the products' summation
    order (bit for bit in the measurements of docs/benchmarks.md, "Issue 18: stacked
    anchors"). A graph with an op vmap cannot batch (data-dependent control flow, an
    ``.item()``) runs the values one at a time."""
    if len(values) > 1:
        try:
            with _quiet_vmap_fallback():
                stacked = torch.vmap(lambda v: tuple(run({name: v})))(torch.stack(values))
        except RuntimeError:
            stacked = None
        if stacked is not None:
            return [[out[k] for out in stacked] for k in range(len(values))]
    return [run({name: v}) for v in values]


#: Depth-shared propagation by default: ``"slope"``, each layer of a role present in >= 8
#: blocks keeps one own anchor (its median choice) and takes only the log-log slope from the
#: anchored blocks around it. Side by side with every layer's own two anchors (docs/
#: benchmarks.md, "Issue 18: the slope-shared damage table by default") it cut the -O2
#: search's wall time 14% / 13% (320M random Llama / SmolLM2) for the same chosen recipe on
#: SmolLM2 and a 0.4% larger drop at the same size on the 320M. ``True`` (the whole line
#: shared, no own forward) saves more but chose worse candidates at 4 of the 320M's 5 sizes
#: (0.00962 vs 0.00944 at 0.16029, "Issue 18: depth-shared anchors"); ``False``: every layer
#: its own anchors.
SHARE_DEPTH: bool | str = "slope"
#: ``SLIMC_SHARE_DEPTH=slope`` (or ``1``/``0``) sets it for one run without a code edit, so an
#: A/B of the search can switch it from the command line (docs/benchmarks.md).
_SHARE_DEPTH_ENV = {"slope": "slope", "1": True, "0": False}
if os.environ.get("SLIMC_SHARE_DEPTH"):
    if os.environ["SLIMC_SHARE_DEPTH"] in _SHARE_DEPTH_ENV:
        SHARE_DEPTH = _SHARE_DEPTH_ENV[os.environ["SLIMC_SHARE_DEPTH"]]
    else:  # a warning, not an import-time traceback in every slimc command
        warnings.warn(f"SLIMC_SHARE_DEPTH={os.environ['SLIMC_SHARE_DEPTH']!r} ignored: expected "
                      "'slope', '1' (whole lines shared) or '0' (every layer's own anchors)",
                      stacklevel=1)


@torch.no_grad()
def measure(ir: IR, ctx: PassContext, choices: list[LayerChoices], spectrum: dict,
            width: int, max_batches: int, method: str = "local",
            anchors: int = 2, info: dict | None = None, suffix: bool = True,
            share_depth: bool | None = None) -> np.ndarray:
    """``damage[i, j]``: output divergence with only layer ``i`` changed to option ``j``.

    An embedding table's damage is also measured on the example inputs (random token ids
    over the whole vocabulary) and the larger value kept: calibration text gathers only the
    rows of its own tokens, so a low-rank or low-bit table can look free on them and still
    hurt every other word. ``method`` (see :data:`DAMAGE_METHODS`) says how each entry is
    obtained. ``suffix``: end-to-end forwards start at the layer's first use (the same
    numbers as whole forwards, about half the work on a decoder); False runs whole forwards.
    ``share_depth``: roles repeated over many blocks take their propagation lines (True) or
    only their slopes (``"slope"``) from anchors every few blocks
    (:func:`.damage.depth_shared`); None: :data:`SHARE_DEPTH`.
    """
    if method not in DAMAGE_METHODS:
        raise ValueError(f"unknown damage method {method!r}")
    batches = calibration_batches(ir, ctx, max_batches)
    kinds = [output_kind(name) for name in ir.output_names]
    references = [run_graph(ir, b) for b in batches]
    wide = [list(ctx.example_inputs)] if ctx.calibration_batches and ctx.example_inputs else []
    wide_refs = [run_graph(ir, b) for b in wide]

    def comparer(refs):
        """outputs -> the largest divergence from ``refs`` over the float outputs (as the
        proxy scorer measures: a layer that only feeds a second output, BERT's pooler, is not
        free), with each reference's side computed once (:func:`divergence_from`)."""
        against = [(r, divergence_from(k, r)) if r.is_floating_point() else (r, None)
                   for k, r in zip(kinds, refs, strict=False)]
        return lambda outs: max((f(o) for (r, f), o in zip(against, outs, strict=False)
                                 if f is not None and r.shape == o.shape), default=0.0)

    references = [comparer(r) for r in references]
    wide_refs = [comparer(r) for r in wide_refs]

    # End-to-end damage runs the graph from the layer's first use on, reusing the unchanged
    # prefix of one reference run per batch (the same ops on the same values, so the same
    # numbers): a decoder layer in block k skips k blocks, about half of every forward.
    def runner(batch: Sequence[torch.Tensor], starts: list[str]):
        if not suffix:
            return lambda overrides: run_graph(ir, batch, overrides)
        return SuffixRunner(ir, batch, starts).run

    weights = [c.layer.weight_node.name for c in choices]
    runners = {"calib": [runner(b, weights) for b in batches],
               "wide": [runner(b, [c.layer.weight_node.name for c in choices if c.gathers])
                        for b in wide]}

    def end_to_end(name: str, value: torch.Tensor, view: str) -> float:
        return end_to_end_many(name, [value], view)[0]

    def end_to_end_many(name: str, values: list[torch.Tensor], view: str) -> list[float]:
        """:func:`end_to_end` of several values of one weight, run as one batch
        (:func:`run_stacked`)."""
        pairs = zip(wide_refs if view == "wide" else references, runners[view], strict=True)
        per_batch = [[worst(outs) for outs in run_stacked(run, name, values)]
                     for worst, run in pairs]
        if view == "wide":
            return [max(col) for col in zip(*per_batch, strict=True)]
        return [sum(col) / len(batches) for col in zip(*per_batch, strict=True)]

    local = {i for i, c in enumerate(choices)
             if method == "local" and local_measurable(c.layer)}
    stats = {"calib": collect(ir, [choices[i].layer for i in local], batches)} if local \
        else {}
    gathering = [choices[i].layer for i in local if choices[i].gathers]
    if wide and gathering:
        stats["wide"] = collect(ir, gathering, wide)
    made = [0]  # bytes of approximations made since the heap was last trimmed
    lock = threading.Lock()

    def made_more(nbytes: int) -> None:
        with lock:
            made[0] += nbytes
            if made[0] <= TRIM_AFTER_BYTES:
                return
            made[0] = 0
        trim_heap()  # freed approximations stay in glibc's heap otherwise (~1 GB, SmolLM2)

    if share_depth is None:
        share_depth = SHARE_DEPTH
    # Roles repeated over many blocks (a decoder's q/k/v/o/gate/up/down) take their
    # propagation line from anchors in every few blocks (:func:`.damage.depth_shared`).
    shared = depth_shared([c.layer.name if i in local and not (c.gathers and wide) else None
                           for i, c in enumerate(choices)]) if share_depth else {}

    def one(i: int, own: bool = True) -> tuple[np.ndarray, int, object]:
        """Layer ``i``'s row of the table, the end-to-end forwards it took, and its
        propagation line (own anchors) or its local errors (``own`` False: the row is made
        from its neighbours' lines afterwards)."""
        c = choices[i]
        row = np.full(width, np.inf)
        name = c.layer.weight_node.name
        stored = ir.get_weight(c.layer.weight_node)
        size = stored.numel() * stored.element_size()
        views = ["calib"] + (["wide"] if c.gathers and wide else [])
        changed = [j for j, o in enumerate(c.options) if o.fmt.kind != "fp32" or o.rank]
        row[:len(c.options)] = 0.0
        spec = spectrum.get(c.layer.name)
        # a small layer's approximations are kept for its anchors' forwards (made once);
        # a large one's are made again when measured: one alive at a time (issue 18:
        # SmolLM2's tied 49152 x 576 table held its nine approximations at once, ~1 GB)
        kept: dict[int, torch.Tensor] = {}
        keep = (own or share_depth == "slope") and \
            size * len(changed) <= KEEP_APPROXIMATIONS_BYTES

        def value(j: int) -> torch.Tensor:
            """Choice ``j``'s weight as the graph stores it."""
            matrix = kept.get(j)
            if matrix is None:
                matrix = approximate_matrix(ir, c, c.options[j], spec)
                made_more(size)
            return c.layer.from_matrix(matrix).to(stored.dtype)

        forwards = 0
        predicted = None
        line = None
        if i in local and changed:
            weight = c.layer.matrix(ir)
            scores = {view: local_error(c.layer, weight, stats[view]) for view in views}
            reference = getattr(scores["calib"], "reference", float("nan"))
            errors = {view: np.zeros(len(changed)) for view in views}
            for a, j in enumerate(changed):
                matrix = approximate_matrix(ir, c, c.options[j], spec)
                made_more(size)
                for view in views:
                    errors[view][a] = scores[view](matrix)
                if keep:
                    kept[j] = matrix
                del matrix
            del scores
            if not own and np.isfinite(errors["calib"]).all() and np.isfinite(reference):
                if share_depth == "slope":  # one own anchor (the median), the slope shared
                    picks = anchor_indices(errors["calib"], anchors)
                    if picks:
                        a = picks[-1]
                        d0 = end_to_end(name, value(changed[a]), "calib")
                        kept.clear()
                        return row, 1, (errors["calib"], float(errors["calib"][a]), d0)
                return row, 0, errors["calib"] * reference  # absolute output errors
            predicted = np.zeros(len(changed))
            for view in views:
                if not np.isfinite(errors[view]).all():
                    predicted = None
                    break
                chosen = anchor_indices(errors[view], anchors)
                if keep or size * len(chosen) <= STACK_ANCHORS_BYTES:  # one forward
                    found = dict(zip(chosen, end_to_end_many(
                        name, [value(changed[a]) for a in chosen], view), strict=True))
                else:
                    found = {a: end_to_end(name, value(changed[a]), view) for a in chosen}
                forwards += len(found)
                predicted = np.maximum(predicted, interpolate(errors[view], found))
                if view == "calib" and np.isfinite(reference):
                    # on the absolute output error: log d = level + slope * log(e * ref)
                    line = fit_line(errors[view], found)
                    if line is not None:
                        line = (line[0] - line[1] * math.log(reference), line[1])
            kept.clear()
        if predicted is not None:
            row[changed] = predicted
            return row, forwards, line
        for j in changed:
            row[j] = max(end_to_end(name, value(j), view) for view in views)
            forwards += len(views)
        return row, forwards, None

    def one_no_grad(i: int, own: bool = True) -> tuple[np.ndarray, int, object]:
        with torch.no_grad():  # grad mode is per thread
            return one(i, own)

    # Layers are independent: one per core, each with single-threaded torch ops (the
    # forwards are small: on 2 cores this halves the table's wall time where the intra-op
    # pool did not; inline on one core or where the search chose one thread). Layers whose
    # lines come from other blocks are scored in the same pass, then completed from them.
    rows = map_single_threaded(lambda i: one_no_grad(i, i not in shared),
                               list(range(len(choices))))
    alone = []
    for i, (lo, hi, t) in shared.items():
        row, _, errors = rows[i]
        lines = (rows[lo][2], rows[hi][2])
        if not isinstance(errors, (np.ndarray, tuple)) or \
                (isinstance(errors, tuple) and len(errors) != 3):
            continue  # measured end to end (its errors were not finite)
        if lines[0] is None or lines[1] is None:
            alone.append(i)  # a neighbour without a line: anchors of its own
            continue
        line = tuple((1 - t) * a + t * b for a, b in zip(lines[0], lines[1], strict=True))
        changed = [j for j, o in enumerate(choices[i].options) if o.fmt.kind != "fp32" or o.rank]
        if isinstance(rows[i][2], tuple):  # "slope": through its own anchor (e0, d0)
            errors, e0, d0 = rows[i][2]
            row[changed] = [d0 * (e / e0) ** line[1] if e > 0 else 0.0 for e in errors]
        else:
            row[changed] = from_line(errors, line)
        rows[i] = (row, rows[i][1], None)
    for i, result in zip(alone, map_single_threaded(one_no_grad, alone), strict=True):
        rows[i] = result
    damage = np.stack([r for r, _, _ in rows]) if rows else np.full((0, width), np.inf)
    measured = sum(f for _, f, _ in rows)
    trim_heap()
    if info is not None:
        info.update(damage_method=method, damage_forwards=measured,
                    damage_local_layers=len(local),
                    damage_shared_layers=len(shared) - len(alone))
    return damage


def layer_patterns(name: str, factored: bool) -> list[str]:
    """Globs that address ``name`` in quantize's ``layers`` option (a factorized layer's two
    factors are ``name`` and ``name:<factor placeholder>``)."""
    exact = glob.escape(name)
    return [exact, f"{exact}:*"] if factored else [exact]
