"""Compile time and peak memory of ``lowrank`` on ResNet-18 (``benchmarks.models:cnn``).

Regression benchmark for issue 13: before the fix, ``lowrank{method=svd,ratio=0.2}`` on this
model did not finish in 38 minutes and ``ratio=0.4`` was OOM-killed at 16 GB (the Tucker-2
reconstruction built an ``O x r_out x I x r_in`` tensor). Each ratio compiles in its own
process so its peak RSS is its own.

    /work/wt/bench.sh python benchmarks/lowrank_cnn_compile.py --ratios 0.2,0.4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(ratio: float, threads: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import slimc

    out = Path(tempfile.mkdtemp(prefix="slimc-cnn-lowrank-"))
    t0 = time.perf_counter()
    model = slimc.compile_model("benchmarks.models:cnn", slimc.CompileOptions(
        pipeline=f"lowrank{{method=svd,ratio={ratio}}}", output=out / "a", threads=threads))
    seconds = time.perf_counter() - t0
    m = model.manifest
    summary = next(p.get("summary", {}) for p in m["pipeline"] if p.get("pass") == "lowrank")
    return {"ratio": ratio, "compile_s": round(seconds, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
            "params_before": m.get("params_before"), "params_after": m["params_after"],
            "factorized": summary.get("factorized"),
            "skipped_cost_model": sum("cost model" in str(v)
                                      for v in summary.get("skipped", {}).values()),
            "verified": m["verification"]["passed"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.2,0.4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.threads)), flush=True)
        return
    for ratio in args.ratios.split(","):
        done = subprocess.run([sys.executable, __file__, "--one", ratio, "--threads",
                               str(args.threads)], capture_output=True, text=True, check=False)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        print(lines[-1] if lines else f"ratio {ratio}: exit {done.returncode} "
              f"{done.stderr.strip().splitlines()[-1:]}", flush=True)


if __name__ == "__main__":
    main()
