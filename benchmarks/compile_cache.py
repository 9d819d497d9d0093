"""Cold compile vs. warm-cache recompile through the `slimc compile` command, as a build system
runs it (a fresh process each time, so Python start-up and imports count).

    python benchmarks/compile_cache.py [--repeats 2]

For each model: a cold compile into an empty cache (SLIMC_CACHE_DIR in a temp folder), then
warm recompiles of the unchanged model, interleaved cold/warm per round. Prints seconds and the
warm/cold ratio, and checks that every artifact is byte-identical to the first cold one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def tiny_llama(work: Path) -> list[str]:
    from tests.models import save_hf

    return [save_hf("llama", work / "tiny-llama"), "-i", "input_ids=1x32:int64",
            "-i", "attention_mask=1x32:int64"]


def minilm(_: Path) -> list[str]:
    from benchmarks.models import minilm_dir

    return [str(minilm_dir())]


def compile_once(args: list[str], out: Path, cache: Path, cold: bool) -> float:
    env = {**os.environ, "SLIMC_CACHE_DIR": str(cache), "SLIMC_CACHE": "1"}
    cmd = [sys.executable, "-m", "slimc", "compile", *args, "-o", str(out), "-q", "-t", "x86"]
    if cold and cache.exists():  # the first cold compile fills the cache; later ones skip it
        cmd.append("--no-cache")
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", default="tiny-llama,minilm")
    opts = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in opts.models.split(","):
            args = {"tiny-llama": tiny_llama, "minilm": minilm}[name](work)
            cache = work / f"cache-{name}"
            cold_s, warm_s = [], []
            first = work / f"{name}-cold0"
            cold_s.append(compile_once(args, first, cache, cold=True))  # fills the cache
            for r in range(opts.repeats):
                warm = work / f"{name}-warm{r}"
                warm_s.append(compile_once(args, warm, cache, cold=False))
                same = all((first / f).read_bytes() == (warm / f).read_bytes()
                           for f in ("model.so", "manifest.json"))
                assert same, f"{name}: warm artifact differs from the cold one"
                if r + 1 < opts.repeats:  # interleave: another cold compile (cache bypassed)
                    cold = work / f"{name}-cold{r + 1}"
                    cold_s.append(compile_once(args, cold, cache, cold=True))
                    assert (cold / "model.so").read_bytes() == (first / "model.so").read_bytes()
            cold_m, warm_m = min(cold_s), min(warm_s)
            print(f"{name:11s} cold {cold_m:6.1f} s  warm {warm_m:5.2f} s  warm/cold "
                  f"{warm_m / cold_m:6.1%}  (cold runs {[round(c, 1) for c in cold_s]}, warm "
                  f"{[round(w, 2) for w in warm_s]}; artifacts byte-identical)")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
