"""Pinned and unpinned runners of one artifact give bitwise-equal outputs (many calls each)."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, "benchmarks")
import models  # noqa: E402
import run  # noqa: E402

for name in sys.argv[2:]:
    _, inputs = getattr(models, name)()
    arrays = {k: v.numpy() for k, v in inputs.items()}
    art = Path(sys.argv[1]) / f"{name}-slimc.slimc"
    pinned, names = run._artifact(art, 2, pin_caller=True)
    plain, _ = run._artifact(art, 2, pin_caller=False)
    feed = [arrays[n] for n in names]
    outs = [r(feed)[0] for _ in range(5) for r in (pinned, plain)]
    print(name, "pinned caller avoids cores", sorted(pinned.pinning.worker_cores or []),
          "bitwise equal:", all(np.array_equal(outs[0], o) for o in outs))
