"""run.py's protocol on levit (slimc, ort; 3-call blocks after 400 ms), recording per block which
CPU each thread of the process last ran on and each thread's affinity."""
import os, sys, time, argparse, glob
os.environ["TVM_NUM_THREADS"] = "2"; os.environ["OMP_NUM_THREADS"] = "2"
sys.path.insert(0, "/work/wt/wake16/benchmarks")
from pathlib import Path
import torch; torch.set_num_threads(2)
import models, run
module, inputs = models.levit_128s()
arrays = {k: v.numpy() for k, v in inputs.items()}
ra = argparse.Namespace(reuse=True, tune_trials=0, target="llvm", threads=2)
runner, names = run._slimc("levit_128s", ra, Path("/tmp/wake16-art"), run.Result("x"))
feed = [arrays[n] for n in names]
sess = run._ort_session(module, inputs, 2, Path("/tmp/wake16-art/levit_128s.onnx"))
def pinned():
    os.sched_setaffinity(0, {0})
    try:
        return runner(feed)
    finally:
        os.sched_setaffinity(0, {0, 1})
callers = {"slimc": pinned, "ort": lambda: sess.run(None, arrays)}
for f in callers.values():
    for _ in range(3): f()
def threads():
    out = []
    for t in sorted(glob.glob("/proc/self/task/*")):
        st = open(t + "/stat").read().rsplit(")", 1)[1].split()
        cpu, utime = int(st[36]), int(st[11]) + int(st[12])
        aff = os.sched_getaffinity(int(t.rsplit("/", 1)[1]))
        out.append((int(t.rsplit("/", 1)[1]), cpu, "".join(map(str, sorted(aff))), utime))
    return out
order = list(callers)
for r in range(int(os.environ.get("ROUNDS", "16"))):
    for e in order[r % 2:] + order[:r % 2]:
        time.sleep(0.4)
        ts = []
        for _ in range(3):
            t0 = time.perf_counter(); callers[e](); ts.append((time.perf_counter() - t0) * 1e3)
        th = threads()
        busy = [f"{tid % 1000}@{cpu}/{aff}:{u}" for tid, cpu, aff, u in th if u > 5]
        print(f"r{r:2} {e:5} " + " ".join(f"{t:5.1f}" for t in ts) + "  " + " ".join(busy), flush=True)
