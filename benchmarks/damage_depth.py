"""Depth-shared propagation lines vs every layer's own anchors, inside a real search.

Runs ``slimc compile ARGS`` (e.g. ``MODEL --target arm -O2 --emulate skip``) with the damage
table measured twice on the same IR and context: every layer with its own end-to-end anchors
(``share_depth=False``, the table before issue 18's search round) and roles repeated over many
blocks taking their lines from anchors every few blocks (the default). Prints one
``DEPTH_RESULT`` JSON line: each table's seconds and end-to-end forwards, the Spearman rank
correlation of the two tables (all entries; per layer across its choices; per choice across
layers) and the relative error of the shared entries; the search then continues with the
``--search-table`` table (``shared``, default, or ``own``), so the compile's choice shows what
that table picks.

    .venv/bin/python benchmarks/damage_depth.py [--search-table own] compile MODEL ... -O2 ...
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from scipy.stats import spearmanr

import slimc.search.space as space
from slimc.cli import main

use = "shared"
if sys.argv[1:2] == ["--search-table"]:
    use = sys.argv[2]
    del sys.argv[1:3]
real = space.measure


def both(*args, **kwargs):
    out = {}
    tables = {}
    infos: dict[str, dict] = {}
    for name, share in (("own", False), ("shared", True)):
        info = infos[name] = {}
        t0 = time.perf_counter()
        tables[name] = real(*args, **{**kwargs, "share_depth": share, "info": info})
        out[name] = {"seconds": round(time.perf_counter() - t0, 1),
                     "forwards": info.get("damage_forwards"),
                     "shared_layers": info.get("damage_shared_layers")}
    a, b = tables["shared"], tables["own"]
    live = np.isfinite(b) & (b > 0)
    per_layer = [spearmanr(a[i][live[i]], b[i][live[i]]).statistic
                 for i in range(len(a)) if live[i].sum() > 2]
    per_choice = [spearmanr(a[:, j][live[:, j]], b[:, j][live[:, j]]).statistic
                  for j in range(a.shape[1]) if live[:, j].sum() > 2]
    differs = live & (a != b)
    ratio = np.abs(np.log(a[differs] / b[differs])) if differs.any() else np.zeros(1)
    out["rank_correlation"] = {
        "all": float(spearmanr(a[live], b[live]).statistic),
        "per_layer_median": float(np.nanmedian(per_layer)),
        "per_layer_min": float(np.nanmin(per_layer)),
        "per_choice_median": float(np.nanmedian(per_choice)),
        "per_choice_min": float(np.nanmin(per_choice))}
    out["shared_entries_abs_log_ratio"] = {"median": float(np.median(ratio)),
                                           "p90": float(np.quantile(ratio, 0.9)),
                                           "max": float(ratio.max())}
    print("DEPTH_RESULT " + json.dumps(out), file=sys.stderr, flush=True)
    if kwargs.get("info") is not None:
        kwargs["info"].update(infos[use])
    return tables[use]


space.measure = both
sys.exit(main())
