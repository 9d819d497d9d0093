"""SmolLM2-135M: `slimc compile --budget size=B` against single techniques at the same size
(issue 17's "the same table" for the LLM), every row through the command line a user runs.

Each row is one `slimc compile` of the real SmolLM2-135M-Instruct (its Q4_1 GGUF as fp32) with
the same calibration (KJV Genesis 1-10, 8 batches) and held-out evaluation (the Gospel of John,
8 batches of 4 x 128 tokens, perplexity of the built library against fp32 PyTorch, from the
artifact's manifest): the search rows with `-O2 --budget size=B`, the single-technique rows
with `--pipeline`. Rows already in the results file are kept (a run can be resumed).

    .venv/bin/python benchmarks/smollm2_budget_table.py MODEL_DIR --work /tmp/smol25 \
        [--rows budget0.15,int4-g32-fz,...]

Writes benchmarks/results/smollm2_budget_table.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.prune_common import RESULTS, kjv  # noqa: E402

#: row name -> (what it is, `slimc compile` arguments that differ between rows)
ROWS: dict[str, tuple[str, list[str]]] = {
    "budget0.5": ("slimc -O2 --budget size=0.5", ["-O2", "--budget", "size=0.5"]),
    "budget0.25": ("slimc -O2 --budget size=0.25", ["-O2", "--budget", "size=0.25"]),
    "budget0.15": ("slimc -O2 --budget size=0.15", ["-O2", "--budget", "size=0.15"]),
    "budget0.10": ("slimc -O2 --budget size=0.10", ["-O2", "--budget", "size=0.10"]),
    "Os0.10": ("slimc -Os --budget size=0.10", ["-Os", "--budget", "size=0.10"]),
    "latency0.5": ("slimc -O2 --budget latency=0.5 (host cost model)",
                   ["-O2", "--budget", "latency=0.5"]),
    "int8": ("int8 (uniform, GPTQ)", ["--pipeline", "quantize{weights=int8,method=gptq}"]),
    "int4-g32-fz": ("int4-g32-fz (uniform, GPTQ)",
                    ["--pipeline", "quantize{weights=int4,group_size=32,zero_point=float,"
                     "method=gptq}"]),
    "int4-g128-fz": ("int4-g128-fz (uniform, GPTQ)",
                     ["--pipeline", "quantize{weights=int4,group_size=128,zero_point=float,"
                      "method=gptq}"]),
    "int4-g32-qs": ("int4-g32-qs (uniform, GPTQ)",
                    ["--pipeline", "quantize{weights=int4-g32-qs,method=gptq}"]),
    "int3-g32-qs5": ("int3-g32-qs5 (uniform, GPTQ)",
                     ["--pipeline", "quantize{weights=int3-g32-qs5,method=gptq}"]),
    "int3-g64": ("int3-g64 (uniform, GPTQ)",
                 ["--pipeline", "quantize{weights=int3,group_size=64,method=gptq}"]),
    "int3-g128": ("int3-g128 (uniform, GPTQ)",
                  ["--pipeline", "quantize{weights=int3,group_size=128,method=gptq}"]),
    "prune0.3+int4": ("structured pruning 0.3 + int4-g32-fz",
                      ["--pipeline", "prune{ratio=0.3},quantize{weights=int4,group_size=32,"
                       "zero_point=float}"]),
}
COMMON = ["--calib-batches", "8", "--eval", "perplexity", "--eval-batches", "8",
          "--input", "input_ids=4x128:int64", "--input", "attention_mask=4x128:int64",
          "--no-cache"]


def data(work: Path) -> tuple[Path, Path]:
    work.mkdir(parents=True, exist_ok=True)
    calib, held_out = work / "genesis.txt", work / "john.txt"
    calib.write_text("\n".join(kjv("Genesis1:1-10:32")))
    held_out.write_text("\n".join(kjv("John1:1-21:25")))
    return calib, held_out


def run_row(name: str, model: str, work: Path, calib: Path, held_out: Path) -> dict:
    label, args = ROWS[name]
    out = work / f"{name}.slimc"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "slimc"), "compile", model, *args,
           "--calib", str(calib), "--eval-data", str(held_out), *COMMON, "-o", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    row = {"row": name, "label": label, "command": " ".join(cmd[1:]),
           "exit": proc.returncode, "seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr or proc.stdout)[-1500:]
        return row
    manifest = json.loads((out / "manifest.json").read_text())
    quality = manifest["quality"]
    row.update(size=manifest["weight_bytes_after"] / manifest["weight_bytes_before"],
               fp32=quality["original"], perplexity=quality["artifact"],
               ratio=quality["artifact"] / quality["original"],
               # the passes and their options (each pass's per-layer summary stays in the
               # artifact's manifest: ~22 KB a row)
               pipeline=[{"pass": p["pass"], "options": p["options"]}
                         for p in manifest.get("pipeline", [])])
    if manifest.get("search"):
        row["chosen"] = (manifest["search"].get("chosen") or {}).get("choices")
        row["search_seconds_by_phase"] = manifest["search"].get("seconds_by_phase")
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--work", type=Path, default=Path("/tmp/smol25"))
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", default="smollm2_budget_table")
    args = ap.parse_args()
    calib, held_out = data(args.work)
    path = RESULTS / f"{args.out}.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    for name in args.rows.split(","):
        if name in results["rows"] and results["rows"][name].get("exit") == 0:
            continue
        results["rows"][name] = row = run_row(name, args.model, args.work, calib, held_out)
        print(json.dumps({k: v for k, v in row.items() if k != "error"}, default=str),
              flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        tmp.replace(path)
    print("\n| row | size | perplexity (John) | x fp32 |\n|---|--:|--:|--:|")
    for row in sorted(results["rows"].values(), key=lambda r: r.get("size", 9)):
        if row.get("exit") == 0:
            print(f"| {row['label']} | {row['size']:.4f} | {row['perplexity']:.2f} | "
                  f"{row['ratio']:.3f} |")
        else:
            print(f"| {row['label']} | - | failed: {row.get('error', '')[-120:]!r} | - |")


if __name__ == "__main__":
    main()
