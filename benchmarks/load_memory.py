"""Loading an artifact: peak and resident memory, and run time, weights in the executable vs
weights read in place from the library (issue 18).

Builds one MLP (``--layers`` x ``--width``^2 fp32) twice for ``--target``: the library format
before this change (every constant inside TVM's serialized executable, which the runtime copies
twice and then copies each constant out of) and the current one (large constants in a raw
section of the library, viewed in place). Each library is loaded and run once in a fresh
process (peak RSS over the load and first call, ``VmHWM`` reset after ``import tvm``); then both
are timed interleaved in one process (median ms per call, batch ``--rows``).

    python benchmarks/load_memory.py                      # 64 MB of weights
    /work/wt/bench.sh python benchmarks/load_memory.py --layers 8 --width 4096   # 512 MB
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_PROBE = """
import json, sys
import numpy as np
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
import tvm
from slimc.backends.tvm.runtime import NativeRunner
x = np.ones((int(sys.argv[2]), int(sys.argv[3])), "float32")
open("/proc/self/clear_refs", "w").write("5")
start = status("VmRSS:")
runner = NativeRunner(sys.argv[1], threads=1)
loaded = status("VmHWM:")
runner([x])
print(json.dumps({"load_peak": loaded - start, "peak": status("VmHWM:") - start,
                  "end": status("VmRSS:") - start}))
"""


def build(layers: int, width: int, rows: int, target: str, out: Path) -> tuple[Path, Path]:
    import torch
    import tvm
    from slimc.backends.tvm.blob_pack import pack_imports_incbin
    from slimc.backends.tvm.build import build_library
    from slimc.backends.tvm.lower import lower_to_relax
    from slimc.backends.tvm.schedules import cpu_pipeline
    from tvm import relax

    from slimc.capture import capture
    from slimc.loaders.base import LoadedModel
    from slimc.targets import resolve_target

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).eval()
    ir, _ = capture(LoadedModel("mlp", model, {"x": torch.randn(rows, width)}))
    spec = resolve_target(target)
    old, new = out / "in_executable.so", out / "in_place.so"
    tvm_target = spec.tvm_target()
    with tvm.transform.PassContext(opt_level=3):
        executable = relax.build(lower_to_relax(ir), target=tvm_target,
                                 relax_pipeline=cpu_pipeline(tvm_target))
    executable.export_library(str(old), fpack_imports=pack_imports_incbin)
    del executable
    build_library(lower_to_relax(ir), spec, new)
    return old, new


def memory(library: Path, rows: int, width: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(library), str(rows), str(width)],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def timing(libraries: dict[str, Path], rows: int, width: int, rounds: int) -> dict[str, float]:
    import numpy as np
    from slimc.backends.tvm.runtime import NativeRunner

    x = np.random.default_rng(0).standard_normal((rows, width)).astype("float32")
    runners = {name: NativeRunner(path, threads=1) for name, path in libraries.items()}
    outs = {name: run([x])[0] for name, run in runners.items()}
    first = next(iter(outs.values()))
    assert all(np.array_equal(first, o) for o in outs.values()), "outputs differ"
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(rounds):
        order = list(runners) if i % 2 == 0 else list(runners)[::-1]
        for name in order:
            time.sleep(0.02)
            t = time.perf_counter()
            for _ in range(5):
                runners[name]([x])
            times[name].append((time.perf_counter() - t) / 5 * 1e3)
    return {name: float(np.median(v)) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--target", default="x86-64-v3")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" /
                        "load_memory.json")
    args = parser.parse_args()
    weights = args.layers * args.width * args.width * 4
    with tempfile.TemporaryDirectory(prefix="slimc-load-") as tmp:
        old, new = build(args.layers, args.width, args.rows, args.target, Path(tmp))
        libraries = {"in_executable": old, "in_place": new}
        result = {"weights_bytes": weights, "target": args.target, "rows": args.rows,
                  "load_average": list(__import__("os").getloadavg())}
        for name, path in libraries.items():
            result[name] = {"library_bytes": path.stat().st_size,
                            **memory(path, args.rows, args.width)}
        ms = timing(libraries, args.rows, args.width, args.rounds)
    for name in libraries:
        result[name]["median_ms"] = ms[name]
    print(f"weights {weights / 1e6:.1f} MB, load average {result['load_average'][0]:.1f}")
    print("| library | RSS peak, load only | peak, load + first call | after | median ms/call |")
    print("|---|---:|---:|---:|---:|")
    for name in libraries:
        r = result[name]
        print(f"| {name} | {r['load_peak'] / weights:.2f}x | {r['peak'] / weights:.2f}x "
              f"| {r['end'] / weights:.2f}x | {r['median_ms']:.3f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
