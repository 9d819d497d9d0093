"""Issue 18, depth-shared anchors, step 2 (step 1: ``benchmarks/damage_depth_trace.py``):
from one model's own-anchor trace, the table with propagation lines shared across depth
(``rel``: lines on the relative local error; ``abs``: on the absolute one, what the search
uses) and the ``hybrid`` (one own anchor per layer, the slope shared) at several strides,
each ranked against the own-anchor table (Spearman: all entries, per choice across layers;
``|log ratio|`` of the entries that differ).

    .venv/bin/python benchmarks/damage_depth_offline.py TRACE.pkl
"""

from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slimc.search.damage import depth_shared, fit_line, from_line  # noqa: E402

recs = pickle.load(open(sys.argv[1], "rb"))
names = [r[0] for r in recs]
width = max(len(r[4]) for r in recs)


def table(rows):
    t = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        t[i, :len(r)] = r
    return t


OWN = table([r[4] for r in recs])


def report(label: str, rows) -> None:
    s = table(rows)
    live = np.isfinite(OWN) & (OWN > 0)
    per_choice = [spearmanr(s[:, j][live[:, j]], OWN[:, j][live[:, j]]).statistic
                  for j in range(width) if live[:, j].sum() > 2]
    r = np.abs(np.log(s[live] / OWN[live]))
    r = r[r > 0]
    print(f"{label}: all {spearmanr(s[live], OWN[live]).statistic:.3f}, per-choice median "
          f"{np.median(per_choice):.3f} min {np.min(per_choice):.3f}, |log ratio| median "
          f"{np.median(r):.3f} p90 {np.quantile(r, .9):.3f}")


def shared_lines(stride: int, mode: str) -> None:
    shared = depth_shared([n if (mode == "rel" or np.isfinite(recs[i][1])) else None
                           for i, n in enumerate(names)], 8, stride)
    rows = [r[4] for r in recs]
    for i, (lo, hi, t) in shared.items():
        lines = []
        for j in (lo, hi):
            line = fit_line(recs[j][2], recs[j][3])
            if line is None:
                break
            if mode == "abs":
                line = (line[0] - line[1] * math.log(recs[j][1]), line[1])
            lines.append(line)
        if len(lines) < 2:
            continue
        line = tuple((1 - t) * a + t * b for a, b in zip(*lines, strict=True))
        e = recs[i][2] * (recs[i][1] if mode == "abs" else 1.0)
        rows[i] = from_line(e, line)
    report(f"stride {stride} {mode}: anchored layers {len(recs) - len(shared)}/{len(recs)}",
           rows)


def hybrid(stride: int) -> None:
    """Sampled blocks: two anchors (the slope); others: their median anchor + the slope
    interpolated in depth."""
    shared = depth_shared(names, 8, stride)
    rows = [r[4] for r in recs]
    for i, (lo, hi, t) in shared.items():
        lines = [fit_line(recs[j][2], recs[j][3]) for j in (lo, hi)]
        if None in lines:
            continue
        slope = (1 - t) * lines[0][1] + t * lines[1][1]
        e, found = recs[i][2], recs[i][3]
        pos = sorted((e[a], d) for a, d in found.items() if d > 0 and e[a] > 0)
        if not pos:
            continue
        e0, d0 = pos[0]
        rows[i] = np.array([d0 * (x / e0) ** slope if x > 0 else 0 for x in e])
    report(f"hybrid stride {stride}: forwards {2 * (len(recs) - len(shared)) + len(shared)}",
           rows)


for stride in (2, 3, 4, 6):
    for mode in ("rel", "abs"):
        shared_lines(stride, mode)
for stride in (2, 4, 8):
    hybrid(stride)
