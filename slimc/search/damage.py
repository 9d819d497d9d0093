"""The damage table, fast: local output error per (layer, choice), scaled per layer by a few
end-to-end anchors.

Measuring every (layer, choice) end to end costs one whole-model forward per layer x choice x
batch (MiniLM, 40 layers x 11 choices: ~440 forwards; SmolLM2, 211 layers x 7: ~1500), which
made ``--budget`` and ``-O2`` take tens of minutes on real models. Most of that is
redundant: for a small weight change ``dW`` the model's output divergence is, to second order,
a quadratic form in the layer's output change ``dY = X dW^T`` -- and so (for a fixed layer and
inputs) close to proportional to the layer's *local* output error. What differs between layers
is how much the rest of the network amplifies or absorbs that error. So:

1. **One observed forward** over the calibration batches (and the example inputs, which cover
   the whole vocabulary for embedding tables) records what each layer's ops read: the Gram
   matrix ``G = X^T X`` of every linear input (shared by the layers reading one activation:
   q/k/v, gate/up), or ``X`` itself while it has fewer rows than columns (smaller; the same
   errors), and how often each embedding row is gathered.
2. **Local error of every choice, batched per layer**: ``tr(dW G dW^T) / tr(W G W^T)`` (the
   relative output energy the choice changes, exact for the calibration inputs) for linear
   uses, the gather-count-weighted relative row error for embedding uses; one ``N x K x K``
   product per choice, no forward.
3. **Per-layer propagation factor from end-to-end anchors**: for each layer, the choices with
   the median and the largest local error (``anchors=2``) are measured end to end exactly as
   before (same divergence, same batches, worst over the float outputs); every other choice's
   damage is interpolated in log-log space between the anchors (beyond them, extrapolated with
   the fitted slope: 1 means divergence proportional to squared output error, what 1 - cosine
   and KL are near the reference). Embedding tables keep the worst of the calibration text
   and the whole-vocabulary view, each with its own anchors.

4. **Propagation shared across depth** (``measure(share_depth=...)``, default
   ``space.SHARE_DEPTH = "slope"``. Why it exists: the anchors' forwards were about half
   of -O2's search on SmolLM2 and a 320M decoder, issue 18): a role repeated in many blocks
   (a decoder's q/k/v/o/gate/up/down, :func:`depth_shared`) is anchored only in its first
   and last block and every few blocks between; the layers in between take the line ``log
   d = level + slope * log(absolute output error)`` interpolated in depth between the two
   nearest anchored blocks of the role. The line is on the *absolute* output error
   (relative error x the layer's output energy ``tr(W G W^T)``): against every layer's own
   anchors it ranked closer than the relative error on SmolLM2 and about the same on a
   random 320M decoder (docs/benchmarks.md, "Issue 18: depth-shared anchors"). Roles in
   fewer blocks, embedding tables and layers with several uses keep their own anchors.
   ``share_depth="slope"`` (the default): a layer between anchored blocks measures its
   median choice end to end and takes only the slope from its neighbours (one forward
   instead of two); ``True`` (whole lines shared, no own forward) chose slightly worse
   candidates on the 320M decoder, so it stays opt-in.

Cost: ``anchors`` forwards per anchored layer (plus one observed forward) instead of one per
choice, and every fake-quantized weight's low-bit grid is cached by content
(:mod:`slimc.lowbit`). Layers whose uses are not linear / matmul / gather (convolutions,
expert tensors, mixed orientations) are measured end to end per choice as before. Measured
against the all end-to-end table on MiniLM (docs/benchmarks.md, "Fast damage table"): rank
correlation, time and the chosen recipes' task scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from slimc.ir import IR
from slimc.layers import Layer
from slimc.observe import observe

#: Slope bounds of the log-log fit (a noisy anchor pair must not invert or explode the table).
SLOPE_RANGE = (0.25, 2.0)
#: Slope when a layer has one usable anchor: divergence ~ squared output change.
DEFAULT_SLOPE = 1.0

LOCAL_ROLES = ("linear", "right", "embedding")
#: Rows of a weight difference taken to float64 at once for its local error.
ROW_CHUNK = 4096


def local_measurable(layer: Layer) -> bool:
    """Every use is a linear, a matmul or a gather, in one orientation."""
    return layer.consistent and not layer.foreign and all(
        u.role in LOCAL_ROLES and (u.role == "embedding" or u.input_arg is not None)
        for u in layer.uses)


@dataclass
class ViewStats:
    """What the layers' ops read on one set of batches."""

    #: activation node name -> Gram matrix ``X^T X`` (float64, ``[K, K]``), once the
    #: activation has more rows than features.
    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    #: activation node name -> the activation rows ``X`` themselves (float64, ``[M, K]``),
    #: while ``M <= K``: then ``X`` is no larger than its Gram matrix, and the errors computed
    #: from it (``|X dW^T|^2``) are the same numbers for less memory and arithmetic.
    xs: dict[str, torch.Tensor] = field(default_factory=dict)

    def add_rows(self, key: str, x: torch.Tensor) -> None:
        """Accumulate the rows ``x`` ``[M, K]`` of an activation, as rows or as a Gram matrix,
        whichever is smaller (issue 18: SmolLM2's Gram matrices were up to 1536 x 1536 doubles
        for a few hundred calibration rows)."""
        if key in self.grams:
            self.grams[key] += x.t() @ x
            return
        if key in self.xs:
            x = torch.cat([self.xs.pop(key), x])
        if x.shape[0] > x.shape[1]:
            self.grams[key] = x.t() @ x
        else:
            self.xs[key] = x

    def has_rows(self, key: str) -> bool:
        return key in self.grams or key in self.xs

    def energy(self, key: str, d: torch.Tensor) -> float:
        """``tr(d G d^T) = |X d^T|^2`` for a ``[N, K]`` matrix ``d`` (float64)."""
        x = self.xs.get(key)
        if x is not None:
            return float((d @ x.t()).pow(2).sum())
        g = self.grams[key]
        return float(((d @ g) * d).sum())
    def energy_of_rows(self, key: str, a: torch.Tensor, minus: torch.Tensor | None = None,
                       rows: int = ROW_CHUNK) -> float:
        """:meth:`energy` of ``a - minus`` (or of ``a``), ``rows`` rows at a time in float64:
        the energy is a sum over rows, and a whole 49152 x 576 tied LM head in float64 was
        two 226 MB temporaries (and the weight's own float64 copy) per choice (issue 18)."""
        total = 0.0
        for start in range(0, a.shape[0], rows):
            d = a[start:start + rows].double()
            if minus is not None:
                d -= minus[start:start + rows]
            total += self.energy(key, d)
        return total
    #: ids node name -> gather count per row.
    counts: dict[str, torch.Tensor] = field(default_factory=dict)


def _activation_key(use) -> str:
    arg = use.node.args[use.input_arg]
    return arg.name if hasattr(arg, "name") else f"{use.node.name}:{use.input_arg}"


def collect(ir: IR, layers: Sequence[Layer], batches: Sequence[Sequence[torch.Tensor]]
            ) -> ViewStats:
    """One observed run of ``batches``: Gram matrices and gather counts for ``layers``."""
    stats = ViewStats()
    observers: dict[str, list[Callable]] = {}
    seen: set[tuple[str, str]] = set()
    for layer in layers:
        for use in layer.uses:
            if use.role == "embedding":
                key = _ids_key(use)
                if ("ids", key) in seen:
                    continue
                seen.add(("ids", key))
                rows = int(layer.shape[layer.perm[0]]) if layer.shape else None

                def gather(node, args, result, key=key, rows=rows):
                    ids = args[1].reshape(-1).long()
                    c = torch.bincount(ids, minlength=rows or int(ids.max()) + 1).double()
                    stats.counts[key] = stats.counts.get(key, 0) + c
                observers.setdefault(use.node.name, []).append(gather)
            else:
                key = _activation_key(use)
                if ("x", key) in seen:
                    continue
                seen.add(("x", key))

                def gram(node, args, result, key=key, index=use.input_arg,
                         axis=use.feature_dim):
                    x = args[index].detach().double().movedim(axis, -1)
                    stats.add_rows(key, x.reshape(-1, x.shape[-1]))
                observers.setdefault(use.node.name, []).append(gram)
    observe(ir, batches, observers)
    return stats


def _ids_key(use) -> str:
    arg = use.node.args[1]
    return arg.name if hasattr(arg, "name") else use.node.name


def local_error(layer: Layer, weight: torch.Tensor, stats: ViewStats
                ) -> Callable[[torch.Tensor], float]:
    """The relative local output error of one approximation of ``weight`` (canonical matrix
    ``[N, K]``), summed over the layer's uses (NaN where the stats lack a use), as a function:
    the reference energies are computed once, and the caller can make each approximation,
    score it and drop it (a 49152 x 576 table's nine approximations held together were ~1 GB
    on SmolLM2)."""
    terms: list[Callable[[torch.Tensor], float]] = []
    references: list[float] = []
    for use in layer.uses:
        if use.role == "embedding":
            c = stats.counts.get(_ids_key(use))
            if c is None:
                return lambda a: float("nan")
            rows = torch.nonzero(c[: weight.shape[0]]).reshape(-1)  # only gathered rows count
            cr, wr = c[rows][:, None], weight[rows].double()
            ref = max(float((cr * wr.pow(2)).sum()), 1e-30)
            references.append(float("nan"))  # gather counts, not output energy
            terms.append(lambda a, rows=rows, cr=cr, wr=wr, ref=ref:
                         float((cr * (a[rows].double() - wr).pow(2)).sum()) / ref)
        else:
            key = _activation_key(use)
            if not stats.has_rows(key):
                return lambda a: float("nan")
            ref = max(stats.energy_of_rows(key, weight), 1e-30)
            references.append(ref)
            terms.append(lambda a, key=key, ref=ref:
                         stats.energy_of_rows(key, a, weight) / ref)

    def error(a: torch.Tensor) -> float:
        return float(sum(term(a) for term in terms))

    #: The layer's output energy on the inputs (``tr(W G W^T)``) for one linear use, NaN
    #: otherwise: relative error x reference = the absolute output error, the scale on which
    #: neighbouring blocks' propagation lines are shared (:func:`depth_shared`).
    error.reference = references[0] if len(references) == 1 else float("nan")
    return error


def local_errors(layer: Layer, weight: torch.Tensor, approximations: Sequence[torch.Tensor],
                 stats: ViewStats) -> np.ndarray:
    """Relative local output error of each approximation of ``weight`` (canonical matrices
    ``[N, K]``), summed over the layer's uses (NaN where the stats lack a use)."""
    error = local_error(layer, weight, stats)
    return np.asarray([error(a) for a in approximations], dtype=float)


def anchor_indices(errors: np.ndarray, count: int) -> list[int]:
    """Which choices to measure end to end: the largest local error, then the median (of the
    choices that change the weight)."""
    live = [j for j in np.argsort(errors) if errors[j] > 0 and np.isfinite(errors[j])]
    if not live or count <= 0:
        return []
    picks = [int(live[-1])]
    if count > 1 and len(live) > 1:
        middle = int(live[(len(live) - 1) // 2])
        if middle not in picks:
            picks.append(middle)
    return picks


def fitted_slope(positive: Sequence[tuple[float, float]]) -> float:
    """The log-log slope between the smallest- and largest-error anchors ``(error, damage)``
    (sorted, positive), clamped to :data:`SLOPE_RANGE`; :data:`DEFAULT_SLOPE` for one."""
    if len(positive) >= 2 and positive[-1][0] > positive[0][0] * 1.01:
        (e0, d0), (e1, d1) = positive[0], positive[-1]
        return min(max(math.log(d1 / d0) / math.log(e1 / e0), SLOPE_RANGE[0]), SLOPE_RANGE[1])
    return DEFAULT_SLOPE


def fit_line(errors: np.ndarray, anchors: dict[int, float]) -> tuple[float, float] | None:
    """A layer's propagation as a line in log-log space, ``log d = level + slope * log e``:
    the anchors' fitted slope and the mean level through them; None without an anchor of
    positive local error and damage (nothing to share with a neighbouring block)."""
    positive = sorted((errors[j], d) for j, d in anchors.items()
                      if errors[j] > 0 and np.isfinite(errors[j]) and d > 0)
    if not positive:
        return None
    slope = fitted_slope(positive)
    level = sum(math.log(d) - slope * math.log(e) for e, d in positive) / len(positive)
    return level, slope


def from_line(errors: np.ndarray, line: tuple[float, float]) -> np.ndarray:
    """Damage of every choice on the line ``(level, slope)`` (0 where the error is 0)."""
    level, slope = line
    out = np.zeros(len(errors))
    for j, e in enumerate(errors):
        if e > 0:
            out[j] = math.exp(level + slope * math.log(e))
    return out


def role_and_block(name: str) -> tuple[str, int] | None:
    """``model.layers.7.mlp.up_proj`` -> (``model.layers.*.mlp.up_proj``, 7): the layer's
    role and its block (the first number in its dotted name); None for a name without one."""
    parts = name.split(".")
    for k, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:k] + ["*"] + parts[k + 1:]), int(part)
    return None


def depth_shared(names: Sequence[str | None], min_blocks: int = 8, stride: int = 4
                 ) -> dict[int, tuple[int, int, float]]:
    """Which layers take their propagation line from other blocks of their role instead of
    anchors of their own: ``index -> (lower, upper, t)``, the anchored layers of the same
    role in the nearest blocks below and above and the position between them (0..1).

    Only roles present in at least ``min_blocks`` blocks share; of those, the first and last
    block and every ``stride``-th between are anchored (``names[i]`` None: not eligible, it
    keeps its own anchors)."""
    roles: dict[str, list[tuple[int, int]]] = {}
    for i, name in enumerate(names):
        found = role_and_block(name) if name is not None else None
        if found is not None:
            roles.setdefault(found[0], []).append((found[1], i))
    shared: dict[int, tuple[int, int, float]] = {}
    for members in roles.values():
        members.sort()
        blocks = [b for b, _ in members]
        if len(members) < min_blocks or len(set(blocks)) != len(blocks):
            continue
        last = len(members) - 1
        anchored = sorted(set(range(0, last, stride)) | {last})
        for lo, hi in zip(anchored, anchored[1:], strict=False):
            (b0, i0), (b1, i1) = members[lo], members[hi]
            for k in range(lo + 1, hi):
                b, i = members[k]
                shared[i] = (i0, i1, (b - b0) / (b1 - b0))
    return shared


def interpolate(errors: np.ndarray, anchors: dict[int, float]) -> np.ndarray:
    """Damage of every choice from its local error and the anchors' measured damage: piecewise
    linear in log-log space, the fitted slope beyond the anchors (see the module docstring)."""
    points = sorted((errors[j], d) for j, d in anchors.items()
                    if errors[j] > 0 and np.isfinite(errors[j]))
    out = np.zeros(len(errors))
    if not points:
        return out
    positive = [(e, d) for e, d in points if d > 0]
    slope = fitted_slope(positive)
    for j, e in enumerate(errors):
        if not e > 0:
            continue
        if not positive:
            out[j] = 0.0
            continue
        below = [p for p in positive if p[0] <= e]
        above = [p for p in positive if p[0] >= e]
        if below and above and above[0][0] > below[-1][0]:
            (e0, d0), (e1, d1) = below[-1], above[0]
            t = math.log(e / e0) / math.log(e1 / e0)
            out[j] = math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0)))
        else:
            e0, d0 = (below[-1] if below else above[0])
            out[j] = d0 * (e / e0) ** slope
    return out
