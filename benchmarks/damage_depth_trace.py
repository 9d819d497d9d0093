"""Issue 18, depth-shared anchors, step 1: run ``slimc compile ARGS`` until its damage table
is measured with every layer's own anchors (``share_depth=False``), dump per layer (name,
reference output energy, local errors, anchors measured, its row) to ``$TRACE_OUT`` (pickle)
and exit. Step 2, ``benchmarks/damage_depth_offline.py TRACE``, rebuilds the table with lines
shared across depth at several strides from that data and ranks it against the own-anchor one.

    TRACE_OUT=/tmp/t.pkl .venv/bin/python benchmarks/damage_depth_trace.py compile MODEL \\
        --target arm -O2 --emulate skip -o OUT --force --no-cache -q --input ...
"""
import os
import pickle
import sys
import threading

import numpy as np

import slimc.search.space as sp
from slimc.cli import main
from slimc.search import damage as dm

tl = threading.local()
records = []
real_local = sp.local_error
real_interp = sp.interpolate

def local_error(layer, weight, stats):
    ref = 0.0
    ok = True
    for use in layer.uses:
        if use.role == "embedding":
            ok = False
            continue
        key = dm._activation_key(use)
        if stats.has_rows(key):
            ref += stats.energy_of_rows(key, weight)
    tl.cur = (layer.name, ref if ok and len(layer.uses) == 1 else float("nan"))
    return real_local(layer, weight, stats)

def interpolate(errors, found):
    out = real_interp(errors, found)
    records.append((tl.cur[0], tl.cur[1], np.array(errors), dict(found), out))
    return out

sp.local_error = local_error
sp.interpolate = interpolate
real_measure = sp.measure

def measure(*a, **k):
    k["share_depth"] = False
    real_measure(*a, **k)
    pickle.dump(records, open(os.environ["TRACE_OUT"], "wb"))
    print("TRACED", len(records), file=sys.stderr, flush=True)
    os._exit(0)

sp.measure = measure
sys.exit(main())
