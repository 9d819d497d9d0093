"""Which layers the measured ``perturbation`` criterion measures, and what the others get.

Measuring a layer costs one model forward per (setting, calibration batch); the proxies cost a
few backward passes for the whole model. On all-MiniLM-L6-v2 the Fisher-weighted ``taylor``
proxy already ranked layers like the measured criterion (Spearman 0.984 over 40 layers), so
measuring every layer mostly re-derives a known order. ``select=disagree`` (the default of
``sensitivity-perturbation``) measures only

* the layers the cheap proxies (:data:`PROXIES`: ``magnitude``, ``taylor``, ``hessian``) rank
  differently, their percentile ranks at the reference setting spreading by more than
  ``threshold``: where the proxies disagree, which one is right is what a measurement is for;
* ``anchors`` layers evenly spaced along the proxies' consensus ranking, so the scale between
  proxy and measurement is fitted over the whole range, not only over the disputed layers.

Every other layer's curve is the ``taylor`` estimate times a per-setting scale: the median
ratio measured / estimated over the measured layers (in logs, robust to the few layers the
proxy gets badly wrong, which are the disputed, hence measured, ones). ``select=all`` measures
every layer (the criterion as it was).
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


def scale_estimates(measured: Mapping[str, Mapping[str, float]],
                    estimates: Mapping[str, Mapping[str, float]],
                    keys: Sequence[str]) -> dict[str, float]:
    """Per setting: ``exp(median(log(measured / estimate)))`` over the measured layers where
    both are positive (1.0 where no layer has both, e.g. a setting nothing changes)."""
    scales = {}
    for key in keys:
        logs = [math.log(m[key] / estimates[n][key]) for n, m in measured.items()
                if m[key] > 0 and estimates[n][key] > 0]
        scales[key] = math.exp(median(logs)) if logs else 1.0
    return scales


def fill_curves(measured: Mapping[str, Mapping[str, float]],
                estimates: Mapping[str, Mapping[str, float]],
                keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """A curve for every layer of ``estimates``: measured where measured, else the scaled
    estimate (see :func:`scale_estimates`)."""
    scales = scale_estimates(measured, estimates, keys)
    return {n: dict(measured[n]) if n in measured else
            {k: est[k] * scales[k] for k in keys} for n, est in estimates.items()}
