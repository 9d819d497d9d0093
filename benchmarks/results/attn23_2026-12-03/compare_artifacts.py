"""New vs base artifacts on the same seeded inputs (rel. L2 of each output)."""

import sys

import numpy as np

import slimc

for m in sys.argv[1:]:
    a = slimc.load(f"/tmp/attn23/new/{m}-slimc.slimc")
    b = slimc.load(f"/tmp/t22/{m}-slimc.slimc")
    rng = np.random.default_rng(0)
    feed = []
    for inp in a.inputs:
        shape, dt = tuple(inp["shape"]), inp["dtype"]
        if "int" in str(dt):
            feed.append(rng.integers(0, 100, shape).astype(dt))
        else:
            feed.append(rng.standard_normal(shape).astype(dt))
    if m.startswith(("bert", "minilm", "distil")) and len(feed) > 1:
        feed[1][:] = 1
        feed[1][0, feed[1].shape[1] // 2:] = 0
    oa, ob = list(a(*feed).values()), list(b(*feed).values())
    print(m, [float(np.linalg.norm(x - y) / np.linalg.norm(y))
              for x, y in zip(oa, ob, strict=True)])
