"""GPU check with artifacts built on a CPU host: ``prepare`` here, ``check`` on the GPU machine.

Why a second GPU check beside ``gpu_check.py``: that one compiles on the GPU machine, which
needs the whole TVM compiler there (a 259 MB library, two device calls of 64 MiB each) and
PyTorch 2.13 (the GPU image has another version). A deployment does the opposite -- slimc
compiles for ``--target h200`` on a build host without a GPU (``nvcc`` from pip, nothing to
run the result on), and the GPU machine only *runs* the artifact -- so this script checks exactly
that: the GPU machine gets TVM's runtime alone (the package without ``libtvm_compiler.so``,
~4 MB compressed) and the prebuilt artifacts.

    python benchmarks/gpu_prebuilt.py prepare             # here: build .gpucheck/ (~20 min)
    # on the GPU machine, one call carrying .gpucheck:
    benchmarks/gpu_prebuilt.sh                             # installs, then `check --out $OUT`

``prepare`` compiles every row for ``h200`` in its precision and stores, beside each artifact,
the reference outputs of the original PyTorch model in fp32 on this CPU for the artifact's own
example inputs (``expected.npz``), and for generation rows the greedy tokens of the
transformers model. ``check`` loads each artifact on ``cuda:0`` through ``slimc.load`` (the
public API a user calls), compares with the reference (relative L2, cosine; greedy tokens
equal), and times the artifact against PyTorch eager and ``torch.compile`` on the same GPU for
the rows whose PyTorch model can be rebuilt there (benchmark factories: same architecture and
shapes, random weights -- timing does not depend on the values). Each engine's time includes
copying the inputs to the GPU and the outputs back, like ``CompiledModel.__call__`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / ".gpucheck"
ROWS = STAGE / "rows"
TARGET = "h200"
#: Where PyTorch runs in ``check``: "cuda", or "cpu" for a dry run of this script on a host
#: without a GPU (``prepare --target llvm --stage DIR`` then ``check --stage DIR``).
DEVICE = "cuda"
PROMPT = [(37 * i + 11) % 128 for i in range(24)]  # token ids < every tiny vocab (128)
GEN_CACHE = 64
NEW_TOKENS = GEN_CACHE - len(PROMPT)


# --- the PyTorch models of the timed rows (importable on both machines) -----------------------

def minilm_shape_b8():
    """A MiniLM-L6-shaped BERT (384 wide, 6 layers, 12 heads) at batch 8 x 128 tokens, with a
    1k-token vocabulary so the fp16 artifact (~20 MB) fits the device machine's 64 MiB carry;
    the encoder's arithmetic is all-MiniLM-L6-v2's."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536, vocab_size=1024,
                                     max_position_embeddings=512)
    model = transformers.BertModel(config).eval()
    sys.path.append(str(ROOT))  # after the installed slimc: the repo holds no slimc.backends
    from benchmarks.models import _text

    return _text(model, 8, 128, config.vocab_size)


def mobilenet_v2_b8():
    """MobileNetV2 1.0 at batch 8 x 224 x 224, He-initialised (``benchmarks/models.py``)."""
    sys.path.append(str(ROOT))  # after the installed slimc: the repo holds no slimc.backends
    from benchmarks.models import mobilenet_v2_he

    return mobilenet_v2_he(batch=8)


TIMED = {"minilm_shape_b8": minilm_shape_b8, "mobilenet_v2_b8": mobilenet_v2_b8}


def rows() -> list[dict]:
    """Every row: label, model string for slimc, pipeline, precision, and how it is checked."""
    tiny_fp16 = ["bert", "gpt2", "llama", "qwen2", "phi", "gemma", "falcon", "mixtral", "vit",
                 "resnet", "t5"]
    out: list[dict] = []
    for precision in ("fp16", "fp32", "bf16"):
        for name in TIMED:
            if precision == "fp32" and name == "minilm_shape_b8":
                continue  # 42 MB of fp32 weights: over the carry with the rest
            out.append(dict(label=name, model=f"{__file__}:{name}", precision=precision,
                            timed=name))
    out.append(dict(label="minilm_shape_b8 int8", model=f"{__file__}:minilm_shape_b8",
                    precision="fp16", pipeline="quantize{weights=int8}", timed="minilm_shape_b8"))
    out.append(dict(label="minilm_shape_b8 int4", model=f"{__file__}:minilm_shape_b8",
                    precision="fp16", pipeline="quantize{weights=int4}", timed="minilm_shape_b8"))
    for precision, archs in (("fp16", tiny_fp16), ("fp32", ["bert", "llama", "vit", "resnet"]),
                             ("bf16", ["bert", "llama"])):
        out += [dict(label=f"tiny-{arch}", hf=arch, precision=precision) for arch in archs]
    out.append(dict(label="tiny-llama int4", hf="llama", precision="fp16",
                    pipeline="quantize{weights=int4}"))
    out.append(dict(label="tiny-bert int8", hf="bert", precision="fp16",
                    pipeline="quantize{weights=int8}"))
    out += [dict(label=f"tiny-{arch} generate", hf=arch, precision=precision, generate=True)
            for arch, precision in (("llama", "fp16"), ("llama", "fp32"), ("qwen2", "fp16"),
                                    ("llama", "bf16"))]
    out.append(dict(label="tiny-llama int4 generate", hf="llama", precision="fp16",
                    pipeline="quantize{weights=int4}", generate=True))
    out += [dict(label=f"tiny-{arch}", hf=arch, precision="fp16")
            for arch in ("mistral", "gpt_neox", "whisper")]
    # symbolic sequence length (GPU targets default to a fixed one): checked at several lengths
    out += [dict(label=f"tiny-{arch} dynamic", hf=arch, precision="fp16", dynamic=True,
                 lengths=[1, 7, 33, 64]) for arch in ("bert", "llama", "gpt2")]
    return out


def row_dir(row: dict) -> Path:
    name = f"{row['label']}_{row['precision']}".replace(" ", "_")
    return ROWS / name


# --- prepare (CPU host) ------------------------------------------------------------------------

def flatten(out) -> list:
    """A model's output (tensor, ModelOutput, dict, nested tuples) as a flat list of tensors."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    result = []
    for item in out:
        result.extend(flatten(item))
    return result


def hf_dir(arch: str) -> Path:
    sys.path.append(str(ROOT))  # after the installed slimc: the repo holds no slimc.backends
    from tests.models import save_hf

    path = STAGE / "hf" / arch
    if not (path / "config.json").exists():
        save_hf(arch, path)
    return path


def greedy_tokens(module, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens of a transformers causal LM with its own KV cache (CPU, fp32)."""
    import torch

    with torch.no_grad():
        out = module(input_ids=torch.tensor([prompt]), use_cache=True)
        cache, tokens = out.past_key_values, [int(out.logits[0, -1].argmax())]
        while len(tokens) < new_tokens:
            out = module(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                         use_cache=True)
            cache = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def prepare_row(row: dict) -> dict:
    import torch

    from slimc import CompileOptions, compile_model
    from slimc.capture import load_model
    from slimc.plugins import get_registry

    model = str(hf_dir(row["hf"])) if "hf" in row else row["model"]
    where = row_dir(row)
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    target = TARGET if TARGET == "llvm" else f"{TARGET}:precision={row['precision']}"
    options = dict(target=target, pipeline=row.get("pipeline"),
                   output=where / "artifact.slimc", cache=False)
    if row.get("generate"):
        options.update(generate=True, max_length=GEN_CACHE, prefill_length=16)
    start = time.perf_counter()
    previous = os.environ.get("SLIMC_DEFAULT_SEQUENCE")
    if row.get("dynamic"):
        os.environ["SLIMC_DEFAULT_SEQUENCE"] = "dynamic"
    try:
        result = compile_model(model, CompileOptions(**options))
    finally:
        if previous is None:
            os.environ.pop("SLIMC_DEFAULT_SEQUENCE", None)
        else:
            os.environ["SLIMC_DEFAULT_SEQUENCE"] = previous
    info = {**row, "compile_s": round(time.perf_counter() - start, 1),
            "host_numerics": result.manifest["verification"].get("host_numerics"),
            "artifact_bytes": sum(f.stat().st_size for f in result.output.iterdir())}
    if row.get("generate"):
        module = load_model(model, {}, get_registry()).module.eval()
        info["expected_tokens"] = greedy_tokens(module, PROMPT, NEW_TOKENS)
    else:
        feed = _example_inputs(result.output)
        loaded = load_model(model, {}, get_registry())
        with torch.no_grad():
            theirs = flatten(loaded.module.eval()(**{k: torch.from_numpy(v)
                                                     for k, v in feed.items()}))
        shapes = [tuple(o["shape"]) for o in result.manifest["outputs"]]
        theirs = [t.float().numpy() for t in theirs[:len(shapes)]]
        if all(_fits(t.shape, shape) for t, shape in zip(theirs, shapes, strict=True)):
            np.savez(where / "expected.npz", *theirs)
        else:
            info["expected"] = f"PyTorch's outputs {[t.shape for t in theirs]} are not the " \
                               f"artifact's {shapes}"
        for length in row.get("lengths", []):
            inputs = _token_inputs(feed, length)
            with torch.no_grad():
                outs = flatten(loaded.module.eval()(**{k: torch.from_numpy(v)
                                                       for k, v in inputs.items()}))
            np.savez(where / f"length_{length}.npz",
                     **{f"in_{k}": v for k, v in inputs.items()},
                     **{f"out_{i}": t.float().numpy() for i, t in enumerate(outs[:len(shapes)])})
    (where / "row.json").write_text(json.dumps(info, indent=1))
    return info


def _fits(actual: tuple, declared: tuple) -> bool:
    """``actual`` matches ``declared`` where it is a number (a symbolic dim matches any)."""
    return len(actual) == len(declared) and all(
        not isinstance(d, int) or a == d for a, d in zip(actual, declared, strict=True))


def _token_inputs(example: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Inputs like the example's at sequence ``length``: random ids, ones for masks, zeros for
    token types."""
    rng = np.random.default_rng(length)
    out = {}
    for name, value in example.items():
        shape = (value.shape[0], length)
        if "mask" in name:
            out[name] = np.ones(shape, value.dtype)
        elif "type" in name:
            out[name] = np.zeros(shape, value.dtype)
        else:
            out[name] = rng.integers(5, 128, shape).astype(value.dtype)
    return out


def _example_inputs(artifact: Path) -> dict[str, np.ndarray]:
    with np.load(artifact / "example_inputs.npz") as data:
        return {k: data[k] for k in data.files}


def prepare(only: str | None) -> int:
    ROWS.mkdir(parents=True, exist_ok=True)
    wanted = [text for text in (only or "").split(",") if text]
    for row in rows():
        name = row_dir(row).name
        if wanted and not any(text == name or text in row["label"] for text in wanted):
            continue
        if (row_dir(row) / "row.json").exists():
            print(f"have {row['label']} {row['precision']}", flush=True)
            continue
        try:
            info = prepare_row(row)
            print(f"built {row['label']} {row['precision']}: {info['compile_s']} s, "
                  f"{info['artifact_bytes'] / 2**20:.1f} MiB", flush=True)
        except Exception as exc:  # noqa: BLE001 - keep building the others, say which failed
            traceback.print_exc()
            print(f"FAILED {row['label']} {row['precision']}: {type(exc).__name__}: {exc}",
                  flush=True)
    total = sum(f.stat().st_size for f in STAGE.rglob("*") if f.is_file())
    print(f"{STAGE}: {total / 2**20:.1f} MiB")
    return 0


# --- check (GPU machine) -----------------------------------------------------------------------

def relative_l2(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    num = sum(float(np.sum((a.astype(np.float64) - e) ** 2)) for e, a in zip(expected, actual,
                                                                              strict=True))
    den = sum(float(np.sum(e.astype(np.float64) ** 2)) for e in expected)
    return (num / den) ** 0.5 if den else num ** 0.5


def median_ms(fn, rounds: int, device: str) -> float:
    """Median wall time of ``fn`` over ``rounds`` calls, the device synchronised after each."""
    import torch

    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def autocast(precision: str, device: str):
    """PyTorch's own mixed precision in ``precision`` on ``device`` (a no-op for fp32)."""
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def time_engines(artifact, feed: dict, timed: str, precision: str, rounds: int,
                 compiled_cache: dict) -> dict:
    """Median ms of the artifact, PyTorch eager and torch.compile (interleaved rounds)."""
    import torch

    module, _ = TIMED[timed]()
    module = module.to(DEVICE).eval()
    on_gpu = {k: torch.from_numpy(v).to(DEVICE) for k, v in feed.items()}
    # torch.compile takes ~30-60 s a model: once per model, in its fp16 row (the GPU default)
    compiled = None
    if precision == "fp16" and timed not in compiled_cache:
        compiled = compiled_cache[timed] = torch.compile(module)

    def torch_call(fn):
        def call():
            inputs = {k: torch.from_numpy(v).to(DEVICE) for k, v in feed.items()}
            return [t.float().cpu() for t in flatten(fn(**inputs))]
        return call

    row: dict = {}
    with torch.no_grad(), autocast(precision, DEVICE):
        engines = {"slimc_ms": lambda: artifact(**feed), "eager_ms": torch_call(module)}
        if compiled is not None:
            compiled(**on_gpu)  # compile outside the timed rounds
            engines["compile_ms"] = torch_call(compiled)
        for fn in engines.values():
            fn()
        samples: dict[str, list[float]] = {k: [] for k in engines}
        for _ in range(rounds):
            for name, fn in engines.items():
                samples[name].append(median_ms(fn, 3, DEVICE))
    for name, values in samples.items():
        row[name] = round(statistics.median(values), 3)
    row["eager_over_slimc"] = round(row["eager_ms"] / row["slimc_ms"], 2)
    if "compile_ms" in row:
        row["compile_over_slimc"] = round(row["compile_ms"] / row["slimc_ms"], 2)
    return row


def check_row(where: Path, rounds: int, compiled_cache: dict) -> dict:
    import slimc

    info = json.loads((where / "row.json").read_text())
    row = {k: info.get(k) for k in ("label", "precision", "pipeline", "compile_s")}
    row["host_rel_l2"] = (info.get("host_numerics") or {}).get("relative_l2_vs_ir")
    start = time.perf_counter()
    artifact = slimc.load(where / "artifact.slimc")
    row["load_s"] = round(time.perf_counter() - start, 2)
    if info.get("generate"):
        artifact.generate(PROMPT, 4, stop=False)  # warm-up
        mine = artifact.generate(PROMPT, NEW_TOKENS, stop=False)
        expected = info["expected_tokens"]
        same = next((i for i, (a, b) in enumerate(zip(mine.tokens, expected, strict=False))
                     if a != b), min(len(mine.tokens), len(expected)))
        row["greedy_equal"] = f"{same}/{len(expected)}"
        row["tokens"] = list(mine.tokens)  # a quantized row's own greedy path differs from fp32
        row["decode_tok_s"] = round(mine.stats["decode_tokens_per_s"], 1)
        return row
    feed = artifact.example_inputs()
    mine = list(artifact(**feed).values())
    if (where / "expected.npz").exists():
        with np.load(where / "expected.npz") as data:
            expected = [data[f"arr_{i}"] for i in range(len(data.files))]
        row["rel_l2_vs_torch_fp32"] = relative_l2(expected, mine)
        flat_e = np.concatenate([e.ravel() for e in expected]).astype(np.float64)
        flat_m = np.concatenate([m.ravel() for m in mine]).astype(np.float64)
        row["cosine"] = float(flat_e @ flat_m / (np.linalg.norm(flat_e) * np.linalg.norm(flat_m)
                                                 + 1e-30))
        row["finite"] = bool(all(np.isfinite(m).all() for m in mine))
    else:
        row["note"] = info.get("expected", "no reference")
    for path in sorted(where.glob("length_*.npz"), key=lambda p: int(p.stem.split("_")[1])):
        with np.load(path) as data:
            inputs = {k[3:]: data[k] for k in data.files if k.startswith("in_")}
            expected = [data[f"out_{i}"] for i in range(sum(k.startswith("out_")
                                                            for k in data.files))]
        got = list(artifact(**inputs).values())[:len(expected)]
        row.setdefault("rel_l2_at_length", {})[path.stem.split("_")[1]] = relative_l2(
            expected, got)
    if info.get("timed"):
        row.update(time_engines(artifact, feed, info["timed"], info["precision"], rounds,
                                compiled_cache))
    return row


def check(out: Path, rounds: int, budget_s: float, only: str | None) -> int:
    import torch

    global DEVICE
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        DEVICE = "cpu"
        print("no CUDA device: PyTorch runs on the CPU (a dry run of this script)")
    print(f"device: {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}", flush=True)
    results, compiled_cache = [], {}
    start = time.perf_counter()
    for where in sorted(ROWS.iterdir()):
        if only and only not in where.name:
            continue
        if time.perf_counter() - start > budget_s:
            results.append({"label": where.name, "skipped": f"budget {budget_s:g} s spent"})
            continue
        try:
            row = check_row(where, rounds, compiled_cache)
        except Exception as exc:  # noqa: BLE001 - report every row, keep going
            traceback.print_exc()
            row = {"label": where.name, "error": f"{type(exc).__name__}: {exc}"[:600]}
        results.append(row)
        print(json.dumps(row), flush=True)
        (out / "gpu_prebuilt.json").write_text(json.dumps(results, indent=1))
    return 0


def main() -> int:
    global STAGE, ROWS, TARGET
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build the artifacts and references (CPU host)")
    p.add_argument("--only", help="row labels containing any of these (comma-separated), or "
                   "row folder names")
    p.add_argument("--target", default=TARGET, help="llvm: a CPU dry run of this script")
    p.add_argument("--stage", type=Path, default=STAGE)
    c = sub.add_parser("check", help="run them on the GPU and time them (GPU machine)")
    c.add_argument("--out", default="gpu_prebuilt_out")
    c.add_argument("--rounds", type=int, default=20)
    c.add_argument("--budget-s", type=float, default=420)
    c.add_argument("--only")
    c.add_argument("--stage", type=Path, default=STAGE)
    args = parser.parse_args()
    STAGE, ROWS = args.stage.resolve(), args.stage.resolve() / "rows"
    TARGET = getattr(args, "target", TARGET)
    if args.command == "prepare":
        return prepare(args.only)
    return check(Path(args.out), args.rounds, args.budget_s, args.only)


if __name__ == "__main__":
    sys.exit(main())
