"""Old vs new artifact of one model, alternating blocks in one process, at 1 and 2 threads: min and median ms."""
import sys, time, statistics
import numpy as np
sys.path.insert(0, '/work/wt/mob')
from pathlib import Path
from slimc.backends.tvm.runtime import NativeRunner
from slimc.artifact import read_manifest
import tvm
model = sys.argv[1]; dirs = sys.argv[2].split(','); rounds = int(sys.argv[3]); threads = [int(t) for t in sys.argv[4].split(',')]
runs = {}
for d in dirs:
    art = Path(d) / f"{model}-slimc.slimc"; m = read_manifest(art)
    r = NativeRunner(art / m['library'], 2)
    data = np.load(art / 'example_inputs.npz')
    runs[d] = (r.vm['main'], [tvm.runtime.tensor(data[k]) for k in data.files])
cfg = tvm.get_global_func('runtime.config_threadpool')
for t in threads:
    cfg(1, t)
    res = {d: [] for d in dirs}
    for rnd in range(rounds):
        for d in (dirs if rnd % 2 == 0 else dirs[::-1]):
            f, a = runs[d]
            f(*a)
            for _ in range(5):
                t0 = time.perf_counter(); f(*a); res[d].append((time.perf_counter() - t0) * 1e3)
    base = dirs[0]
    print(model, f"threads {t}: " + "  ".join(f"{d}: min {min(v):.3f} med {statistics.median(v):.3f} (med/{base} {statistics.median(v)/statistics.median(res[base]):.3f}, min/{base} {min(v)/min(res[base]):.3f})" for d, v in res.items()))
