"""``lowrank``: factorize weight matrices into two thinner ones the compiled library really runs.

``lowrank{method=whiten|svd|asvd, ratio=0.2 | energy=0.9, embeddings=false, round_to=...,
skip=lm_head|*.down_proj, only=embeddings|linears|convolutions}`` replaces ``W[N, K]`` by
``U[N, r] · V[r, K]`` (see :mod:`.factorize` for the three methods, :mod:`.rewrite` for the IR
edit). The rank of each layer comes from

* ``ratio``: remove this fraction of the *model's* parameters; every factorized layer keeps the
  same fraction of its own (SVD-LLM's uniform allocation), found by bisection so the count is
  met after rounding;
* ``ratio`` with ``allocation=measured`` (``probe_keeps=0.5|0.7|0.9, bands=3, probe_batches=2,
  damage=l2|kl``): ranks by *measured* damage (:func:`.allocate.measured_ranks`): layers are
  grouped by role and band of blocks, each group alone is truncated to each probed fraction
  (ranks rounded as below) and the model's output damage is measured on the last
  ``probe_batches`` calibration batches, which the whitening does not see; a multiple-choice
  knapsack then keeps per group one fraction or dense at the least summed damage under the
  budget. On SmolLM2-135M at 20% of all parameters this took the KJV perplexity from 3.84x
  (uniform) to 1.92x dense (docs/benchmarks.md, round 4): the budget goes to the groups whose
  cuts cost least (queries, ``o_proj``, mid-depth MLP), not evenly;
* ``energy``: the smallest rank keeping this fraction of ``Σσ²`` (in the method's metric: for
  ``whiten`` that is the fraction of the layer's output energy on the calibration data).

Ranks are multiples of ``round_to`` (the target's fp32 vector width by default), and a layer is
factorized only when that is cheaper: ``r·(N+K) < N·K`` (fewer weights and multiply-adds) and,
when the target has hardware numbers (``target-info``), the roofline of :mod:`.conv_cost` says
the two GEMMs are faster than the one; a convolution's Tucker-2 form is priced by the same
roofline, with the multiplies the target really does (its Winograd 3x3 convs). Every layer not
factorized is recorded with its reason.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from typing import Literal

import torch
from pydantic import Field, model_validator
from slimc.passes.quantize import calib

from slimc import coverage
from slimc.backend import TargetInfo
from slimc.errors import UsageError
from slimc.ir import IR, hinted_shape
from slimc.layers import find_layers
from slimc.passmanager import PassContext, PassOptions, PreservedAnalyses, TransformPass

from . import allocate, conv_cost, factorize, tucker
from .rewrite import factorize_layer, is_factor, weight_layers
from .sequential import factorize_sequentially

#: ``allocation=sensitivity``: calibration batches per probe, bands of blocks per layer role,
#: and the fraction of its parameters a probed group keeps.
SENSITIVITY_BATCHES = 2
SENSITIVITY_BANDS = 3
PROBE_KEEP = 0.6


class LowRankOptions(PassOptions):
    method: Literal["whiten", "svd", "asvd"] = Field(
        "whiten", description="whiten: SVD-LLM (Cholesky of the calibration XᵀX, output-error "
        "optimal); svd: plain truncated SVD of W; asvd: activation-scaled SVD (ASVD).")
    ratio: float | None = Field(None, gt=0, lt=1, description="Fraction of the model's "
                                "parameters to remove (default 0.2 unless `energy` is given).")
    energy: float | None = Field(None, gt=0, le=1, description="Instead of `ratio`: per "
                                 "layer, the smallest rank keeping this fraction of Σσ².")
    embeddings: bool = Field(False, description="Factorize embedding tables too (vocab×r and "
                             "r×d; a tied output head shares both factors).")
    allocation: Literal["uniform", "global", "sensitivity", "measured"] = Field(
        "uniform", description="`ratio`: uniform keeps the same fraction of every layer "
        "(SVD-LLM); global keeps, across all layers, the singular directions with the most "
        "relative output energy per stored parameter (layers whose spectrum decays fast "
        "give more); sensitivity weighs each layer's predicted output loss by the model-output "
        "distortion measured when its group (role x band of blocks) alone is truncated, and "
        "minimises the weighted loss under the budget (ASVD / SVD-LLM v2 heterogeneous ranks; "
        "a few calibration forwards per group); measured truncates each group alone to every "
        "kept fraction of `probe_keeps`, measures the model's damage on the last "
        "`probe_batches` calibration batches (held apart from the whitening ones) and picks "
        "per group one fraction or dense by multiple-choice knapsack (least summed damage "
        "under the budget).")
    probe_keeps: str = Field("0.5,0.7,0.9", description="allocation=measured: the kept "
                             "fractions of its parameters each group is probed at "
                             "(comma-separated, in (0, 1)); dense is always a candidate.")
    bands: int = Field(3, ge=1, le=64, description="allocation=measured: bands of adjacent "
                       "blocks per layer role (groups = roles x bands).")
    probe_batches: int = Field(2, ge=1, le=64, description="allocation=measured: the last "
                               "this many calibration batches measure damage and are not "
                               "whitened on (with no more batches than this, all do both).")
    damage: Literal["l2", "kl"] = Field("l2", description="allocation=measured: the damage "
                                        "measured, l2 = relative squared error of the model's "
                                        "output, kl = mean KL divergence of its softmax over "
                                        "the last dimension (for logits).")
    round_to: int | None = Field(None, ge=1, le=256, description="Ranks are multiples of "
                                 "this (default: the target's fp32 vector width).")
    alpha: float = Field(0.5, ge=0, le=2, description="`asvd`: exponent of the activation "
                         "scaling mean|x|^alpha.")
    sequential: bool = Field(False, description="`whiten`: factorize in graph order, each "
                             "layer whitened on activations of the already-compressed layers "
                             "before it and refitted in closed form (least squares) to the "
                             "dense model's outputs there.")
    skip: str = Field("", description="Glob patterns of layer names to leave dense, separated "
                      "by `|` (or `,` in a recipe): e.g. `lm_head|*.down_proj*` (a `,` inside "
                      "--pipeline text would end the option).")
    only: Literal["embeddings", "linears", "convolutions"] | None = Field(
        None, description="Factorize only this kind of layer (default: linears and "
        "convolutions, plus embeddings with embeddings=true). `only=embeddings` factorizes the "
        "embedding tables alone, so a following pass (e.g. prune) can take the rest of a "
        "budget from the linears.")
    ranks: str = Field("", description="Explicit ranks instead of `ratio`/`energy`: "
                       "comma-separated `LAYER=RANK` (only these layers are factorized, at "
                       "exactly these ranks). What `--budget` searches write into recipes.")

    @model_validator(mode="after")
    def _one_rule(self) -> LowRankOptions:
        if self.ratio is not None and self.energy is not None:
            raise ValueError("give either ratio (parameter budget) or energy (per-layer "
                             "spectrum threshold), not both")
        if self.ranks and (self.ratio is not None or self.energy is not None):
            raise ValueError("give either ranks (explicit per layer) or ratio/energy, not both")
        explicit_ranks(self.ranks)
        keeps = self.keep_levels
        if not keeps or any(not 0 < k < 1 for k in keeps):
            raise ValueError(f"probe_keeps={self.probe_keeps!r}: give kept fractions in (0, 1) "
                             "separated by `,` or `|`, e.g. 0.5|0.7|0.9")
        if self.only in ("linears", "convolutions") and self.embeddings:
            raise ValueError(f"only={self.only} excludes embeddings; drop embeddings=true or "
                             "use only=embeddings")
        return self

    @property
    def keep_levels(self) -> list[float]:
        try:
            return [float(t) for t in re.split(r"[|,]", self.probe_keeps) if t.strip()]
        except ValueError:
            return []

    @property
    def target_ratio(self) -> float | None:
        if self.ranks:
            return None
        return None if self.energy is not None else (self.ratio or 0.2)


class LowRank(TransformPass):
    """Factorize linear (and optionally embedding) weights W ≈ U·V by plain, whitened (SVD-LLM)
    or activation-scaled (ASVD) SVD, where that makes the layer cheaper on the target."""

    name = "lowrank"
    Options = LowRankOptions

    def run(self, ir: IR, ctx: PassContext, options: PassOptions) -> PreservedAnalyses:
        assert isinstance(options, LowRankOptions)
        summary = lowrank_ir(ir, ctx, options)
        ir.annotations[self.name] = summary
        ctx.log(f"lowrank: {summary['factorized']} layers factorized, params "
                f"{summary['params_before']:,} -> {summary['params_after']:,}; "
                + coverage.describe(summary["coverage"], "factorized"))
        return PreservedAnalyses.none() if summary["factorized"] else PreservedAnalyses.all()


def explicit_ranks(text: str) -> dict[str, int]:
    """The ``ranks`` option, ``LAYER=RANK,...``, as a dict."""
    ranks = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, sep, rank = item.rpartition("=")
        if not sep or not name.strip() or not rank.strip().isdigit() or int(rank) < 1:
            raise ValueError(f"ranks entry {item!r} is not LAYER=RANK (a positive integer)")
        ranks[name.strip()] = int(rank)
    return ranks


def skip_patterns(text: str) -> list[str]:
    """The ``skip`` option's glob patterns: ``|``-separated, so that several fit in one
    ``--pipeline`` option (where ``,`` separates options); ``,`` still works in recipes."""
    return [p.strip() for p in re.split(r"[|,]", text) if p.strip()]


def default_round_to(ctx: PassContext) -> int:
    """The target's fp32 vector width (the ``target-info`` analysis), 8 without a target."""
    from slimc.passes.prune.prune import default_round_to as width

    has_info = ctx.target is not None and ctx.analyses is not None
    return width(ctx.analyses.get("target-info") if has_info else None)


def spectra(ir: IR, layers: list, ctx: PassContext, method: str, alpha: float,
            skipped: dict[str, str], batches=None) -> dict[str, factorize.Spectrum]:
    """Each layer's spectrum in the method's metric (embeddings: plain SVD, a gather has no
    input activations to weight by), on ``batches`` (default: all calibration batches)."""
    stats = {}
    dense = [la for la in layers if not la.is_embedding]
    if method != "svd" and dense:
        stats = calib.collect(ir, dense, batches or ctx.calibration(),
                              hessian=method == "whiten")
    out = {}
    for layer in layers:
        matrix = layer.matrix(ir)
        st = stats.get(layer.name)
        try:
            if layer.is_embedding or method == "svd" or st is None or not st.rows:
                out[layer.name] = factorize.plain(matrix)
            elif method == "whiten":
                out[layer.name] = factorize.whitened(matrix, st.hessian)
            else:
                out[layer.name] = factorize.activation_scaled(matrix, st.mean_abs, alpha)
        except (ValueError, torch.linalg.LinAlgError) as exc:
            skipped[layer.name] = f"factorization failed: {exc}"
    return out


def _tokens(layer) -> int:
    """Rows the layer multiplies per run (batch x sequence), from the op's output shape."""
    node = layer.uses[0].node
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dim() >= 1:
        return max(1, math.prod(hinted_shape(val)[:-1]))
    return 1


def linear_worth(info: TargetInfo | None, n: int, k: int, r: int, tokens: int) -> str | None:
    """Why the two GEMMs of rank ``r`` are not worth it on the target (None: they are, or the
    target has no hardware numbers): the roofline of :mod:`.conv_cost`, the one convolutions
    are priced by."""
    dense = conv_cost.linear_seconds(info, n, k, tokens)
    split = conv_cost.linear_seconds(info, n, k, tokens, r)
    if dense is None or split is None or split < dense:
        return None
    where = info.hardware or info.target if info is not None else "the target"
    return (f"rank {r}: the cost model says two GEMMs are slower on {where} "
            f"({split * 1e6:.1f} us vs {dense * 1e6:.1f} us dense)")


def choose_ranks(ir: IR, layers: list, spec: dict[str, factorize.Spectrum],
                 options: LowRankOptions, round_to: int,
                 skipped: dict[str, str], convs: list = (), batches=(),
                 info: TargetInfo | None = None, notes: dict | None = None) -> dict:
    """Rank per layer (only layers worth factorizing): an int for a linear, the channel
    ranks ``(r_out, r_in)`` for a convolution (``info``: the target's facts, whose roofline
    prices linears and convs alike; without hardware numbers the size rule alone decides)."""
    shapes = {la.name: tuple(la.matrix(ir).shape) for la in layers if la.name in spec}

    def worth(name: str, r: int) -> str | None:
        n, k = shapes[name]
        if r <= 0:
            return f"rank rounded to a multiple of {round_to} is 0"
        if r * (n + k) >= n * k:
            return (f"rank {r} is not below N·K/(N+K) = {factorize.max_useful_rank(n, k):.0f}: "
                    "two factors would be larger than the matrix")
        return linear_worth(info, n, k, r, tokens[name])

    tokens = {la.name: _tokens(la) for la in layers}
    if options.ranks:
        wanted = explicit_ranks(options.ranks)
        ranks = {}
        for name in spec:
            if name not in wanted:
                skipped[name] = "not listed in ranks="
                continue
            n, k = shapes[name]
            r = min(wanted[name], min(n, k))
            if r * (n + k) >= n * k:
                skipped[name] = (f"rank {r} is not below N·K/(N+K) = "
                                 f"{factorize.max_useful_rank(n, k):.0f}")
            else:
                ranks[name] = r
        return ranks
    if options.energy is not None:
        ranks = {}
        for conv in convs:
            pair = tucker.energy_ranks(ir.get_weight(conv.weight_node), options.energy,
                                       round_to)
            reason = conv_worth(conv, pair, info)
            if reason:
                skipped[conv.name] = reason
            else:
                ranks[conv.name] = pair
        for name, sp in spec.items():
            n, k = shapes[name]
            r = factorize.round_rank(sp.energy_rank(options.energy), round_to, min(n, k))
            reason = worth(name, r)
            if reason:
                skipped[name] = reason
            else:
                ranks[name] = r
        return ranks

    goal = options.target_ratio * ir.num_params()
    if options.allocation == "global":
        for conv in convs:
            skipped[conv.name] = "convolution: allocation=global ranks linear layers only " \
                                 "(use allocation=uniform or energy= for convolutions)"
        return _global_ranks(spec, shapes, goal, round_to, worth, skipped)
    if options.allocation == "measured":
        for conv in convs:
            skipped[conv.name] = "convolution: allocation=measured ranks linear layers " \
                                 "only (use allocation=uniform or energy= for convolutions)"
        ranks, report = allocate.measured_ranks(
            ir, layers, spec, shapes, batches, options.keep_levels, round_to, options.bands,
            goal, worth, options.damage)
        if notes is not None:
            notes["groups"] = report
        for name in spec:
            if name not in ranks and name not in skipped:
                skipped[name] = "measured allocation: kept dense (its group's cuts cost the " \
                                "most damage per parameter saved)"
        return ranks
    if options.allocation == "sensitivity":
        for conv in convs:
            skipped[conv.name] = "convolution: allocation=sensitivity ranks linear layers " \
                                 "only (use allocation=uniform or energy= for convolutions)"
        weights = allocate.sensitivity_weights(
            ir, layers, spec, shapes, list(batches)[:SENSITIVITY_BATCHES], PROBE_KEEP,
            round_to, SENSITIVITY_BANDS)
        ranks = allocate.weighted_ranks(spec, shapes, weights, goal, round_to, worth)
        for name in spec:
            if name not in ranks and name not in skipped:
                skipped[name] = "sensitivity allocation: kept dense (most sensitive per " \
                                "parameter saved)"
        return ranks

    why_not: dict[int, dict[str, str]] = {}  # id(plan) -> why each layer is not in it

    def plan(keep: float) -> tuple[dict, int]:
        ranks, removed, reasons = {}, 0, {}
        for name in spec:
            n, k = shapes[name]
            r = factorize.rank_for_ratio(n, k, keep, round_to)
            if (reason := worth(name, r)) is None:
                ranks[name] = r
                removed += n * k - r * (n + k)
            else:
                reasons[name] = reason
        for conv in convs:
            o, i, kernel = conv_dims(conv)
            pair = tucker.ranks_for_keep(o, i, kernel, keep, round_to)
            if (reason := conv_worth(conv, pair, info)) is None:
                ranks[conv.name] = pair
                removed += o * i * kernel - tucker.params(o, i, kernel, *pair)
            else:
                reasons[conv.name] = reason
        why_not[id(ranks)] = reasons
        return ranks, removed

    # removed params fall as the kept fraction grows; the cost model can make a layer drop
    # out at a rank and come back at a smaller one, so the closest plan seen wins
    ranks, *_ = factorize.closest_plan(plan, goal, 0.0, 1.0, removed_grows=False)
    reasons = why_not.get(id(ranks), {})
    for name in [*spec, *(c.name for c in convs)]:
        if name not in ranks and name not in skipped:
            skipped[name] = reasons.get(name, "not needed for the budget")
    return ranks


def conv_dims(conv) -> tuple[int, int, int]:
    """``(O, I, kernel elements)`` of a convolution layer."""
    return int(conv.shape[0]), int(conv.shape[1]), math.prod(int(d) for d in conv.shape[2:])


def conv_worth(conv, pair: tuple[int, int], info: TargetInfo | None = None) -> str | None:
    """Why factorizing ``conv`` at channel ranks ``pair`` is not worth it (None: it is):
    more weights, or slower on the target by the cost model of :mod:`.conv_cost` (the
    multiplies the target really does: Winograd 3x3 convs included)."""
    o, i, kernel = conv_dims(conv)
    if min(pair) <= 0:
        return "no channel ranks (rounded to the vector width) store fewer weights"
    if tucker.params(o, i, kernel, *pair) >= o * i * kernel:
        return f"channel ranks {pair}: the factors would not be smaller than the kernel"
    dense, split = conv_cost.seconds(conv, info), conv_cost.seconds(conv, info, *pair)
    if dense is None or split is None:
        dense, split = tucker.macs(conv, *pair)
        if split >= dense:
            return f"channel ranks {pair}: the factorized convs do more multiply-adds"
        return None
    if split >= dense:
        where = info.hardware or info.target if info is not None else "the target"
        how = (f"{split * 1e6:.0f} us vs {dense * 1e6:.0f} us dense" if info is not None
               and info.mem_bandwidth_gbs else f"{split / 2:.3g} vs {dense / 2:.3g} multiplies")
        return (f"channel ranks {pair}: the cost model says the factorized convs are slower "
                f"on {where} ({how}; dense 3x3 convs run as Winograd there)"
                if _winograd(conv, info) else
                f"channel ranks {pair}: the cost model says the factorized convs are slower "
                f"on {where} ({how})")
    return None


def _winograd(conv, info: TargetInfo | None) -> bool:
    found = conv_cost.calls(conv)
    return bool(info is not None and info.winograd is not None and found and any(
        c.winograd_eligible and c.multiplies(info) < c.multiplies(None) for c in found))


def _global_ranks(spec: dict[str, factorize.Spectrum], shapes: dict, goal: float,
                  round_to: int, worth, skipped: dict[str, str]) -> dict[str, int]:
    """Keep singular direction i of layer l when its share of the layer's energy per stored
    parameter, ``σ_i² / Σσ² / (N+K)``, is above a threshold; bisect the threshold (in log
    space) until the removed parameters meet ``goal``."""
    density = {name: sp.s.double().square() / sp.s.double().square().sum().clamp_min(1e-300)
               / sum(shapes[name]) for name, sp in spec.items()}

    def plan(log_t: float) -> tuple[dict[str, int], int]:
        ranks, removed = {}, 0
        for name, d in density.items():
            n, k = shapes[name]
            r = factorize.round_rank(max(1, int((d >= 10.0 ** log_t).sum())), round_to,
                                     min(n, k))
            if worth(name, r) is None:
                ranks[name] = r
                removed += n * k - r * (n + k)
        return ranks, removed

    # removed params grow with the (log) threshold
    ranks, *_ = factorize.closest_plan(plan, goal, -30.0, 0.0, removed_grows=True, steps=60)
    for name in spec:
        if name not in ranks and name not in skipped:
            skipped[name] = "global allocation: dense is cheaper than the rank it keeps"
    return ranks


def _record_unsupported(ir: IR, skipped: dict[str, str], handled_convs: set[str]) -> None:
    """Weight-bearing layers this pass cannot factorize, each with the reason."""
    from slimc.layers import find_layers as all_layers

    handled = {la.weight_node.name for la in weight_layers(ir, embeddings=True)} | handled_convs
    for layer in all_layers(ir):
        if layer.weight.name in handled:
            continue
        if layer.kind == "conv_transpose":
            skipped[layer.name] = "transposed convolution: not factorized"
        elif layer.kind == "conv":
            skipped.setdefault(layer.name, tucker.unsupported(layer)
                               or "convolution weight also read by other ops")
        elif layer.kind == "expert":
            skipped[layer.name] = "batched expert weights: not factorized"
        else:
            skipped[layer.name] = "weight also read by ops other than linear/embedding, or " \
                                  "in two orientations"


def _check_ranks_name_layers(ir: IR, listed: dict[str, int], options: LowRankOptions) -> None:
    """A ``ranks`` entry naming no layer would leave the model unfactorized and the compile
    would succeed as if asked for nothing (a typo, or a short name where the full one is
    needed); say which names are unknown and what the model's layers are called."""
    names = [la.name for la in weight_layers(ir, embeddings=True)]
    names += [la.name for la in find_layers(ir, complete_only=True) if la.kind == "conv"]
    unknown = [n for n in listed if n not in names]
    if not unknown:
        return
    suffix = [n for n in names if n.endswith("." + unknown[0])]
    close = suffix or difflib.get_close_matches(unknown[0], names, n=3, cutoff=0.5)
    hint = f"Did you mean {', '.join(close[:3])}? " if close else \
        f"Layers are named like {', '.join(names[:3])}. "
    raise UsageError(f"lowrank ranks={options.ranks!r} names {len(unknown)} layer(s) the model "
                     f"does not have ({', '.join(unknown[:5])}), so nothing would be factorized "
                     "there.", hint=hint + "`slimc analyze MODEL` lists the layer names.")


def lowrank_ir(ir: IR, ctx: PassContext, options: LowRankOptions) -> dict:
    """Factorize ``ir`` in place; returns a JSON summary (per-layer ranks, skipped reasons)."""
    params_before, bytes_before = ir.num_params(), ir.weight_bytes()
    inventory, reasons = coverage.inventory(ir), coverage.default_reasons(ir)
    weight_of = {la.name: la.weight.name for la in find_layers(ir)}
    patterns = skip_patterns(options.skip)
    only = options.only
    skipped: dict[str, str] = {}
    layers = []
    for layer in weight_layers(ir, embeddings=options.embeddings or only == "embeddings"):
        if any(fnmatch.fnmatch(layer.name, p) for p in patterns):
            skipped[layer.name] = "matched skip="
        elif only is not None and only != ("embeddings" if layer.is_embedding else "linears"):
            skipped[layer.name] = f"only={only}"
        elif is_factor(layer):
            skipped[layer.name] = "already a low-rank factor"
        else:
            layers.append(layer)
    if options.ranks:  # factorize (and collect statistics for) the listed layers only
        listed = explicit_ranks(options.ranks)
        _check_ranks_name_layers(ir, listed, options)
        for layer in [la for la in layers if la.name not in listed]:
            skipped[layer.name] = "not listed in ranks="
            layers.remove(layer)
    convs = []
    for layer in find_layers(ir, complete_only=True):
        if layer.kind != "conv" or tucker.FACTOR_NAME.search(layer.weight_node.name):
            continue
        if any(fnmatch.fnmatch(layer.name, p) for p in patterns):
            skipped[layer.name] = "matched skip="
        elif only is not None and only != "convolutions":
            skipped[layer.name] = f"only={only}"
        elif options.ranks:
            skipped[layer.name] = "convolution: ranks= lists linear layers only"
        elif reason := tucker.unsupported(layer):
            skipped[layer.name] = reason
        else:
            convs.append(layer)
    _record_unsupported(ir, skipped, {c.weight_node.name for c in convs})
    round_to = options.round_to or default_round_to(ctx)
    whiten, notes = ctx.calibration(), {}
    batches = ctx.calibration(SENSITIVITY_BATCHES) if options.allocation == "sensitivity" \
        else ()
    if options.allocation == "measured" and options.target_ratio is not None:
        # damage is measured on batches the spectra were not fitted on, when there are enough
        batches = whiten[-options.probe_batches:]
        if len(whiten) > options.probe_batches:
            whiten = whiten[:-options.probe_batches]
        notes.update(probe_batches=len(batches), whiten_batches=len(whiten),
                     held_apart=len(whiten) + len(batches) == len(ctx.calibration()))
    if options.sequential and options.method == "whiten" and options.energy is None \
            and options.allocation == "uniform":
        # uniform ranks follow from the shapes: the only calibration pass is the staged one
        spec = spectra(ir, [la for la in layers if la.is_embedding], ctx, "svd",
                       options.alpha, skipped)
        spec.update({la.name: None for la in layers if not la.is_embedding})
    else:
        spec = spectra(ir, layers, ctx, options.method, options.alpha, skipped, whiten)
    info = ctx.analyses.get("target-info") \
        if ctx.target is not None and ctx.analyses is not None else None
    ranks = choose_ranks(ir, layers, spec, options, round_to, skipped, convs, batches, info,
                         notes)
    per_layer = {}
    for conv in convs:
        pair = ranks.get(conv.name)
        if pair is None:
            continue
        o, i, kernel = conv_dims(conv)
        dense = ir.get_weight(conv.weight_node).detach().float()
        approx = tucker.factorize_conv(ir, conv, *pair)
        err = float((approx - dense).norm() / dense.norm().clamp_min(1e-30))
        per_layer[conv.name] = {"rank": list(pair), "shape": list(conv.shape),
                                "params": [o * i * kernel, tucker.params(o, i, kernel, *pair)],
                                "method": "svd" if kernel == 1 else "tucker2",
                                "predicted_loss": round(err ** 2, 6)}

    def apply(layer, sp: factorize.Spectrum, r: int) -> None:
        n, k = layer.matrix(ir).shape
        u, v = sp.factors(r)
        factorize_layer(ir, layer, u, v)
        method = "svd" if layer.is_embedding else options.method
        per_layer[layer.name] = {"rank": r, "shape": [int(n), int(k)],
                                 "params": [int(n * k), int(r * (n + k))],
                                 "method": method + ("+sequential" if staged else ""),
                                 "predicted_loss": round(sp.loss(r), 6)}

    staged = options.sequential and options.method == "whiten"
    if staged:
        linears = [la for la in layers if not la.is_embedding and la.name in ranks]
        factorize_sequentially(ir, linears, ranks, whiten, apply, skipped)
        staged = False  # the embeddings below are plain SVD
    for layer in layers:
        r = ranks.get(layer.name)
        if r is None or layer.name in per_layer or layer.name in skipped:
            continue
        apply(layer, spec[layer.name], r)
    if per_layer:
        ir.remove_unused_weights()
        ir.refresh_meta()
        ir.changed()
    reached = {weight_of[name] for name in per_layer if name in weight_of}
    reasons.update({weight_of[name]: why for name, why in skipped.items() if name in weight_of})
    return {"method": options.method, "round_to": round_to,
            "ratio": options.target_ratio, "energy": options.energy,
            "factorized": len(per_layer), "params_before": params_before,
            **({"allocation": {"measured": notes}} if notes else {}),
            "params_after": ir.num_params(), "bytes_before": bytes_before,
            "bytes_after": ir.weight_bytes(), "per_layer": per_layer, "skipped": skipped,
            "coverage": coverage.coverage(inventory, reached, reasons)}
