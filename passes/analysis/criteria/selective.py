"""Which layers the measured ``perturbation`` criterion measures, and what the others get.

Measuring a layer costs one model forward per (setting, calibration batch); the proxies cost a
few backward passes for the whole model. On all-MiniLM-L6-v2 the Fisher-weighted ``taylor``
proxy already ranked layers like the measured criterion (Spearman 0.984 over 40 layers), so
measuring every layer mostly re-derives a known order. ``select=disagree`` (``slimc
analyze``'s default, ``--perturbation disagree``) measures only

* the layers the cheap proxies (:data:`PROXIES`: ``magnitude``, ``taylor``, ``hessian``) rank
  differently, their percentile ranks at the reference setting spreading by more than
  ``threshold``: where the proxies disagree, which one is right is what a measurement is for;
* ``anchors`` layers evenly spaced along the proxies' consensus ranking, so the scale between
  proxy and measurement is fitted over the whole range, not only over the disputed layers.

A proxy that does not rank the layers like the estimator at all (Spearman below
``min_agreement`` with ``taylor``) is left out of the vote (:func:`voters`): its disagreement
is noise, not a dispute worth a measurement. On SmolLM2-135M magnitude carries no signal
(Spearman 0.08 with taylor and with the measured criterion: its weights already sit on a 4-bit
grid), so with it in the vote 146 of 211 layers and all 90 groups were "disputed" and measured
(779 of 1118 CPU seconds); without it, 16 layers and 8 groups.

Every other layer's curve is the ``taylor`` estimate times a per-setting scale: the median
ratio measured / estimated over the measured layers (in logs, robust to the few layers the
proxy gets badly wrong, which are the disputed, hence measured, ones). By default a chosen
layer is measured at the reference setting only, its other settings following the taylor
curve's shape (``measure_settings=all``: every setting). ``select=all`` measures every layer
(the criterion as it was, and the pass default).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import median

#: The proxies whose disagreement decides what is measured (cheap: no per-layer forwards).
PROXIES = ("magnitude", "taylor", "hessian")
#: The proxy unmeasured layers' curves are scaled from (the best-agreeing one on MiniLM).
ESTIMATOR = "taylor"


def rank_percentiles(scores: Mapping[str, float]) -> dict[str, float]:
    """Layer -> its rank among ``scores`` as a fraction in [0, 1] (0: least sensitive); ties
    share their mean rank, so equal scores never look like a disagreement."""
    order = sorted(scores, key=lambda n: scores[n])
    last = max(len(order) - 1, 1)
    out: dict[str, float] = {}
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for n in order[i:j + 1]:
            out[n] = (i + j) / 2 / last
        i = j + 1
    return out


def rank_spread(proxy_scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Layer -> the largest minus the smallest of its percentile ranks under the proxies."""
    ranks = [rank_percentiles(scores) for scores in proxy_scores.values()]
    names = list(next(iter(proxy_scores.values())))
    return {n: max(r[n] for r in ranks) - min(r[n] for r in ranks) for n in names}


def spearman(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Spearman rank correlation of two score maps over their common keys (ties: mean rank);
    0.0 when either is constant or fewer than 3 keys are shared."""
    import warnings

    from scipy.stats import spearmanr

    keys = [k for k in a if k in b]
    if len(keys) < 3:
        return 0.0
    with warnings.catch_warnings():  # constant input: NaN and a warning; 0.0 here
        warnings.simplefilter("ignore")
        value = float(spearmanr([a[k] for k in keys], [b[k] for k in keys]).statistic)
    return value if math.isfinite(value) else 0.0


def voters(proxy_scores: Mapping[str, Mapping[str, float]], min_agreement: float,
           estimator: str = ESTIMATOR) -> dict[str, Mapping[str, float]]:
    """The proxies whose ranking agrees with ``estimator``'s (Spearman >= ``min_agreement``;
    the estimator itself always votes). Without the estimator, every proxy votes."""
    if estimator not in proxy_scores:
        return dict(proxy_scores)
    reference = proxy_scores[estimator]
    return {name: scores for name, scores in proxy_scores.items()
            if name == estimator or spearman(scores, reference) >= min_agreement}


def choose_layers(proxy_scores: Mapping[str, Mapping[str, float]], threshold: float,
                  anchors: int) -> list[str]:
    """The layers to measure: rank spread above ``threshold``, plus ``anchors`` layers evenly
    spaced along the mean percentile rank (in the proxies' layer order)."""
    ranks = [rank_percentiles(scores) for scores in proxy_scores.values()]
    names = list(next(iter(proxy_scores.values())))
    spread = rank_spread(proxy_scores)
    chosen = {n for n in names if spread[n] > threshold}
    consensus = sorted(names, key=lambda n: sum(r[n] for r in ranks))
    count = min(anchors, len(consensus))
    for i in range(count):
        chosen.add(consensus[round(i * (len(consensus) - 1) / max(count - 1, 1))])
    return [n for n in names if n in chosen]


def _log_ratios(measured: Mapping[str, float], estimate: Mapping[str, float]) -> list[float]:
    return [math.log(v / estimate[k]) for k, v in measured.items()
            if v > 0 and estimate.get(k, 0) > 0]


def fill_curves(measured: Mapping[str, Mapping[str, float]],
                estimates: Mapping[str, Mapping[str, float]],
                keys_of: Mapping[str, Sequence[str]]) -> dict[str, dict[str, float]]:
    """A curve over ``keys_of[item]`` for every item: measured values where measured; an
    item measured at some settings only: its estimate times its own median measured/estimate
    ratio; an item not measured: its estimate times the median ratio at that setting over the
    measured items (else over every measured value; 1.0 if nothing positive was measured)."""
    per_key: dict[str, list[float]] = {}
    for item, values in measured.items():
        for key, v in values.items():
            e = estimates[item].get(key, 0)
            if v > 0 and e > 0:
                per_key.setdefault(key, []).append(math.log(v / e))
    everything = [x for logs in per_key.values() for x in logs]
    fallback = median(everything) if everything else 0.0
    out: dict[str, dict[str, float]] = {}
    for item, keys in keys_of.items():
        have = dict(measured.get(item, {}))
        own = _log_ratios(have, estimates[item])
        for key in keys:
            if key in have:
                continue
            if own:
                scale = median(own)
            else:
                scale = median(per_key[key]) if per_key.get(key) else fallback
            have[key] = estimates[item].get(key, 0.0) * math.exp(scale)
        out[item] = {key: have[key] for key in keys}
    return out
