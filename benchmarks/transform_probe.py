"""Probe slimc's transforms and searches on tiny real Hugging Face models, through the CLI, as
a user would: ``-O1/-O2/-O3/-Os``, int8/int4/W8A8 quantization, pruning, low rank, layer
sharing, ``--budget size=0.25``, ``slimc analyze``, ``slimc explore`` and ``--target arm``.

    python benchmarks/transform_probe.py --workdir /tmp/tp20 --json rows.json [--models a,b]
        [--variants int8,prune] [--parallel 2]
    python benchmarks/transform_probe.py --workdir /tmp/tp20 --bad-inputs --json bad.json

Every run is its own ``slimc`` process with a timeout (a crash or a hang is one row). A row's
``outcome``: ``ok`` (exit 0, the artifact verified), ``usage`` (exit 2, one paragraph, no
artifact), ``fail`` (exit 1 or a traceback), ``unverified`` (exit 0 but the manifest does not
say the verification passed), ``partial`` (a refusal that left files behind), ``timeout``.
Rows also keep the fidelity vs the original model and the passes' coverage (what a transform
left untouched and why), so silently skipped layers show up.

``--bad-inputs`` runs the mistakes a user makes (wrong pass names/options, budget typos,
unreadable calibration/eval files, unwritable outputs, a corrupt model folder): each must be
exit 2, one paragraph, no traceback, nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_probe  # noqa: E402

TOKENIZER_DIR = Path("/tmp/mem-bench/smollm2-135m")  # made by benchmarks/arm_real_llm.py
KJV = Path("/tmp/budget_bench/kjv_calib.txt")
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             vocab_size=128, max_position_embeddings=64)
DEC = dict(SMALL, num_key_value_heads=2)
TEXT_IN = ["--input", "input_ids=1x16:int64"]

#: name -> (config class, model class, config kwargs, input args, kind, uses tokenizer)
MODELS: dict[str, tuple[str, str, dict, list[str], str, bool]] = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(DEC, head_dim=8), TEXT_IN, "text", True),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(DEC, head_dim=8, sliding_window=8), TEXT_IN, "text", False),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(DEC, pad_token_id=0), TEXT_IN, "text",
             False),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(SMALL, rotary_pct=0.5), TEXT_IN,
                 "text", True),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                 vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=32), TEXT_IN,
            "text", False),
    "bloom": ("BloomConfig", "BloomForCausalLM",
              dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=128), TEXT_IN, "text", False),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(DEC, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                       num_experts=4, num_experts_per_tok=2), TEXT_IN, "text", False),
    "t5": ("T5Config", "T5Model",
           dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, vocab_size=128, d_kv=8),
           ["--input", "input_ids=1x16:int64", "--input", "decoder_input_ids=1x8:int64"],
           "text", False),
    "deberta_v2": ("DebertaV2Config", "DebertaV2Model",
                   dict(SMALL, relative_attention=True, pos_att_type=["p2c", "c2p"],
                        position_buckets=16, norm_rel_ebd="layer_norm", share_att_key=True,
                        position_biased_input=False), TEXT_IN, "text", False),
    "convnext": ("ConvNextConfig", "ConvNextModel",
                 dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32), [],
                 "vision", False),
    "mobilevit": ("MobileViTConfig", "MobileViTModel",
                  dict(image_size=64, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16,
                                                                                      16, 24,
                                                                                      32, 64],
                       num_attention_heads=2, initializer_range=0.2), [], "vision", False),
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model", dict(hf_probe.AUDIO),
                 ["--input", "input_values=1x1600:float32"], "audio", False),
}

#: name -> (command, extra args); CALIB / EVAL are replaced per model.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "int8": ("compile", ["-p", "quantize{weights=int8}"]),
    "int4": ("compile", ["-p", "quantize{weights=int4,group_size=32}"]),
    "prune": ("compile", ["-p", "prune{ratio=0.3}", "--calib", "CALIB"]),
    "w8a8": ("compile", ["-p", "quantize{weights=int8,activations=int8}", "--calib", "CALIB"]),
    "lowrank": ("compile", ["-p", "lowrank{ratio=0.2}", "--calib", "CALIB"]),
    "share": ("compile", ["-p", "share{basis=true,ratio=0.2}", "--calib", "CALIB"]),
    "O1": ("compile", ["-O1"]),
    "O2": ("compile", ["-O2", "--calib", "CALIB", "EVAL"]),
    "budget": ("compile", ["--budget", "size=0.25", "--calib", "CALIB", "EVAL"]),
    "O3": ("compile", ["-O3", "--calib", "CALIB", "EVAL"]),
    "Os": ("compile", ["-Os", "--calib", "CALIB", "EVAL"]),
    "share_blocks": ("compile", ["-p", "share{blocks=true,ratio=0.2}", "--calib", "CALIB"]),
    "analyze": ("analyze", ["--calib", "CALIB"]),
    "explore": ("explore", ["--calib", "CALIB", "EVAL", "--sizes", "0.5,0.25",
                            "--latencies", "0.75"]),
    "arm_int8": ("compile", ["--target", "arm", "-p", "quantize{weights=int8}"]),
    "arm_w8a8": ("compile", ["--target", "arm", "-p",
                             "quantize{weights=int8,activations=int8}", "--calib", "CALIB"]),
}


def build(name: str, model_dir: Path) -> None:
    """Save a tiny random model (and, for perplexity, a real tokenizer with its vocabulary)."""
    import torch
    import transformers as T

    cfg_cls, model_cls, kwargs, _, _, tok = MODELS[name]
    kwargs = dict(kwargs)
    if tok:
        tokenizer = T.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        kwargs["vocab_size"] = len(tokenizer)
    torch.manual_seed(0)
    config = getattr(T, cfg_cls)(**kwargs)
    config.architectures = [model_cls]
    getattr(T, model_cls)(config).eval().save_pretrained(model_dir)
    if tok:
        tokenizer.save_pretrained(model_dir)


def data_files(name: str, workdir: Path) -> tuple[Path, Path | None]:
    """Calibration data a user would have for the model's modality, and --eval-data (text
    models with a tokenizer: a held-out text for perplexity)."""
    kind, tok = MODELS[name][4], MODELS[name][5]
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    text = KJV.read_text()
    if kind == "text":
        calib = data / "calib.txt"
        calib.write_text(text[: len(text) // 2])
        evals = data / "eval.txt" if tok else None
        if evals:
            evals.write_text(text[len(text) // 2:])
        return calib, evals
    rng = np.random.default_rng(0)
    if kind == "vision":
        size = MODELS[name][2].get("image_size", 32)
        calib = data / f"pixels_{size}.npy"
        np.save(calib, rng.standard_normal((8, 3, size, size)).astype(np.float32))
    else:
        calib = data / "audio.npy"
        np.save(calib, rng.standard_normal((8, 1600)).astype(np.float32) * 0.1)
    return calib, None


def coverage(summary: dict) -> list[dict]:
    """Per transform: what fraction of the weights it reached and why the rest was not."""
    rows = []
    for entry in summary.get("pipeline", []):
        if entry.get("kind") != "transform":
            continue
        s = entry.get("summary")
        if isinstance(s, str):  # the CLI summary keeps a repr
            rows.append({"pass": entry.get("pass"), "summary": s[:400]})
            continue
        cov = (s or {}).get("coverage") or {}
        rows.append({"pass": entry.get("pass"), "reached": cov.get("reached_fraction"),
                     "untouched": [u.get("reason") for u in cov.get("untouched", [])]})
    return rows


def classify(proc: subprocess.CompletedProcess, out: Path, want_artifact: bool) -> dict:
    row: dict = {"exit": proc.returncode}
    tb = "Traceback (most recent call last)" in (proc.stderr + proc.stdout)
    try:
        doc = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        doc = {}
    if proc.returncode == 0:
        if not want_artifact:
            row["outcome"] = "ok" if not tb else "fail"
            return row
        ver = doc.get("verification") or {}
        row["verify_rel_l2"] = ver.get("relative_l2_vs_ir")
        row["fidelity_rel_l2"] = (doc.get("fidelity") or {}).get("relative_l2")
        row["bytes_ratio"] = (round(doc["weight_bytes_after"] / doc["weight_bytes_before"], 3)
                              if doc.get("weight_bytes_before") else None)
        row["passes"] = [p.get("pass") for p in doc.get("pipeline", [])]
        row["coverage"] = coverage(doc)
        row["outcome"] = "ok" if ver.get("passed") and (out / "model.so").exists() else \
            "unverified"
        if tb:
            row["outcome"] = "fail"
        return row
    err = doc.get("error") or ""
    row["error"] = (err + " | " + (doc.get("hint") or ""))[:700] if err else \
        (proc.stderr or proc.stdout)[-1500:]
    if proc.returncode == 2 and not tb:
        left = out.exists() and any(out.iterdir())
        row["outcome"] = "partial" if left and want_artifact else "usage"
    else:
        row["outcome"] = "fail"
    return row


def run_one(name: str, variant: str, workdir: Path, timeout: float) -> dict:
    model_dir = workdir / "models" / name
    if not (model_dir / "config.json").exists():
        build(name, model_dir)
    calib, evals = data_files(name, workdir)
    command, extra = VARIANTS[variant]
    args = []
    for a in extra:
        if a == "CALIB":
            args.append(str(calib))
        elif a == "EVAL":
            args += ["--eval-data", str(evals)] if evals else []
        else:
            args.append(a)
    out = workdir / "out" / f"{name}.{variant}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "slimc", command, str(model_dir), "-o", str(out), "--json",
           "-q", *MODELS[name][3], *args]
    if command == "compile":
        cmd += ["--force", "--no-cache"]
    row: dict = {"model": name, "variant": variant, "cmd": " ".join(cmd[2:])}
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row.update(outcome="timeout", seconds=round(time.time() - start))
        return row
    row["seconds"] = round(time.time() - start)
    row.update(classify(proc, out, command == "compile"))
    return row


# --- bad inputs -----------------------------------------------------------------------------

def bad_inputs(workdir: Path) -> list[tuple[str, list[str], Path]]:
    """(label, slimc argv, output dir) for mistakes users make; each must be exit 2."""
    good = workdir / "models" / "qwen3"
    if not (good / "config.json").exists():
        build("qwen3", good)
    vis = workdir / "models" / "convnext"
    if not (vis / "config.json").exists():
        build("convnext", vis)
    bad = workdir / "bad"
    shutil.rmtree(bad, ignore_errors=True)
    bad.mkdir(parents=True)
    (bad / "empty.txt").write_text("")
    (bad / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (bad / "short.txt").write_text("In the beginning")
    (bad / "ws.txt").write_text("   \n\n  \t\n")
    np.save(bad / "short.npy", np.zeros((0, 16), dtype=np.int64))
    np.save(bad / "float_ids.npy", np.random.default_rng(0).random((4, 16)))
    np.save(bad / "ids_oob.npy", np.full((4, 16), 10**6, dtype=np.int64))
    (bad / "fake.npy").write_text("not numpy")
    (bad / "eval.csv").write_text("a,b,c\nx,y,notanumber\n")
    (bad / "eval.json").write_text('{"text": "hello"}')
    (bad / "eval_bin.txt").write_bytes(b"\x00\xff" * 512)
    ro = bad / "readonly"
    ro.mkdir()
    os.chmod(ro, stat.S_IRUSR | stat.S_IXUSR)
    corrupt_cfg = bad / "corrupt_cfg"
    shutil.copytree(good, corrupt_cfg)
    (corrupt_cfg / "config.json").write_text('{"model_type": "qwen3", "hidden_size": ')
    corrupt_st = bad / "corrupt_st"
    shutil.copytree(good, corrupt_st)
    st = corrupt_st / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    trunc_st = bad / "trunc_st"
    shutil.copytree(good, trunc_st)
    st = trunc_st / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) - 4096])
    wrong_type = bad / "wrong_type"
    shutil.copytree(good, wrong_type)
    cfg = json.loads((wrong_type / "config.json").read_text())
    cfg["model_type"] = "no_such_model_type"
    (wrong_type / "config.json").write_text(json.dumps(cfg))
    g, o = str(good), lambda s: bad / "out" / s  # noqa: E731
    T = ["--input", "input_ids=1x16:int64"]
    P = "quantize{weights=int8}"
    cases = [
        ("unknown pass", ["compile", g, *T, "-p", "quantise{weights=int8}"], o("p1")),
        ("unknown option", ["compile", g, *T, "-p", "quantize{weight=int8}"], o("p2")),
        ("bad option value", ["compile", g, *T, "-p", "quantize{weights=int9}"], o("p3")),
        ("option out of range", ["compile", g, *T, "-p", "prune{ratio=1.5}"], o("p4")),
        ("option wrong type", ["compile", g, *T, "-p", "prune{ratio=abc}"], o("p5")),
        ("unbalanced braces", ["compile", g, *T, "-p", "prune{ratio=0.3"], o("p6")),
        ("empty pipeline", ["compile", g, *T, "-p", ""], o("p7")),
        ("analysis as pipeline", ["compile", g, *T, "-p", "sensitivity{bits=9}"], o("p8")),
        ("int4 group not divisor", ["compile", g, *T, "-p",
                                    "quantize{weights=int4,group_size=24}"], o("p9")),
        ("w8a8 with int4", ["compile", g, *T, "-p",
                            "quantize{weights=int4,activations=int8}"], o("p10")),
        ("lowrank ratio and energy", ["compile", g, *T, "-p",
                                      "lowrank{ratio=0.2,energy=0.9}"], o("p11")),
        ("lowrank bad ranks", ["compile", g, *T, "-p", "lowrank{ranks=foo=3}"], o("p12")),
        ("prune bad skip glob", ["compile", g, *T, "-p", "lowrank{skip=[}"], o("p13")),
        ("quantize bad layers rule", ["compile", g, *T, "-p",
                                      "quantize{layers=[*q_proj=int7]}"], o("p14")),
        ("budget typo key", ["compile", g, *T, "--budget", "sise=0.25"], o("b1")),
        ("budget no value", ["compile", g, *T, "--budget", "size="], o("b2")),
        ("budget > 1", ["compile", g, *T, "--budget", "size=2"], o("b3")),
        ("budget negative", ["compile", g, *T, "--budget", "size=-0.5"], o("b4")),
        ("budget percent", ["compile", g, *T, "--budget", "size=25%"], o("b5")),
        ("budget with pipeline", ["compile", g, *T, "--budget", "size=0.5", "-p", P], o("b6")),
        ("budget and -O2", ["compile", g, *T, "--budget", "size=0.5", "-O2"], o("b7")),
        ("bad -O level", ["compile", g, *T, "-O4"], o("b8")),
        ("calib empty", ["compile", g, *T, "-p", "prune{ratio=0.3}", "--calib",
                         str(bad / "empty.txt")], o("c1")),
        ("calib binary", ["compile", g, *T, "-p", "prune{ratio=0.3}", "--calib",
                          str(bad / "binary.txt")], o("c2")),
        ("calib too short", ["compile", g, *T, "-p",
                             "quantize{weights=int8,activations=int8}", "--calib",
                             str(bad / "short.txt")], o("c3")),
        ("calib whitespace", ["compile", g, *T, "-p", "lowrank{ratio=0.2}", "--calib",
                              str(bad / "ws.txt")], o("c4")),
        ("calib npy zero rows", ["compile", g, *T, "-p", "prune{ratio=0.3}", "--calib",
                                 str(bad / "short.npy")], o("c5")),
        ("calib npy float ids", ["compile", g, *T, "-p", "prune{ratio=0.3}", "--calib",
                                 str(bad / "float_ids.npy")], o("c6")),
        ("calib npy ids out of vocab", ["compile", g, *T, "-p", "prune{ratio=0.3}",
                                        "--calib", str(bad / "ids_oob.npy")], o("c7")),
        ("calib fake npy", ["compile", g, *T, "-p", "prune{ratio=0.3}", "--calib",
                            str(bad / "fake.npy")], o("c8")),
        ("calib missing", ["compile", g, *T, "-p", "prune{ratio=0.3}", "--calib",
                           str(bad / "nope.txt")], o("c9")),
        ("calib text for vision", ["compile", str(vis), "-p", "prune{ratio=0.3}", "--calib",
                                   str(bad / "short.txt")], o("c10")),
        ("calib dir without images", ["compile", str(vis), "-p", "prune{ratio=0.3}",
                                      "--calib", str(bad / "readonly")], o("c11")),
        ("eval csv bad score", ["compile", g, *T, "-O2", "--eval-data",
                                str(bad / "eval.csv")], o("e1")),
        ("eval json", ["compile", g, *T, "-O2", "--eval-data", str(bad / "eval.json")],
         o("e2")),
        ("eval binary text", ["compile", g, *T, "-O2", "--eval-data",
                              str(bad / "eval_bin.txt")], o("e3")),
        ("eval empty", ["compile", g, *T, "--budget", "size=0.5", "--eval-data",
                        str(bad / "empty.txt")], o("e4")),
        ("eval wrong metric", ["compile", g, *T, "-O2", "--eval", "accuracy", "--eval-data",
                               str(bad / "short.txt")], o("e5")),
        ("eval unknown metric", ["compile", g, *T, "-O2", "--eval", "bleu", "--eval-data",
                                 str(bad / "short.txt")], o("e6")),
        ("output in missing dir", ["compile", g, *T, "-p", P],
         bad / "missing" / "deeper" / "x"),
        ("output in read-only dir", ["compile", g, *T, "-p", P], ro / "x"),
        ("output is a file", ["compile", g, *T, "-p", P], bad / "empty.txt"),
        ("corrupt config.json", ["compile", str(corrupt_cfg), *T, "-p", P], o("m1")),
        ("corrupt safetensors", ["compile", str(corrupt_st), *T, "-p", P], o("m2")),
        ("truncated safetensors", ["compile", str(trunc_st), *T, "-p", P], o("m3")),
        ("unknown model_type", ["compile", str(wrong_type), *T, "-p", P], o("m4")),
        ("analyze corrupt config", ["analyze", str(corrupt_cfg), *T], o("a1")),
        ("analyze calib empty", ["analyze", g, *T, "--calib", str(bad / "empty.txt")],
         o("a2")),
        ("explore bad sizes", ["explore", g, *T, "--sizes", "0.5,abc"], o("x1")),
        ("explore sizes > 1", ["explore", g, *T, "--sizes", "1.5"], o("x2")),
        ("explore read-only out", ["explore", g, *T, "--sizes", "0.5"], ro / "x"),
        ("arm bad target", ["compile", g, *T, "--target", "armv9-fancy", "-p", P], o("t1")),
    ]
    return cases


def run_bad(label: str, argv: list[str], out: Path, timeout: float) -> dict:
    existed = out.exists()
    before = sorted(p.name for p in out.iterdir()) if existed and out.is_dir() else None
    extra = ["--force", "--no-cache"] if argv[0] == "compile" else []
    cmd = [sys.executable, "-m", "slimc", *argv, "-o", str(out), "-q", *extra]
    row: dict = {"case": label, "cmd": " ".join(cmd[2:])}
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row.update(outcome="timeout", seconds=round(time.time() - start))
        return row
    row["seconds"] = round(time.time() - start)
    row["exit"] = proc.returncode
    text = (proc.stderr + proc.stdout).strip()
    row["message"] = text[-700:]
    tb = "Traceback" in text
    if out.is_dir():
        after = sorted(p.name for p in out.iterdir())
        row["left_behind"] = after if after != (before or []) else []
    ok = proc.returncode == 2 and not tb and not row.get("left_behind")
    row["outcome"] = "usage" if ok else ("ok-exit0" if proc.returncode == 0 else "bug")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/transform_probe"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS
                                                   if not v.startswith("arm")))
    ap.add_argument("--order", choices=["variant", "model"], default="variant",
                    help="variant: every model for the first variant, then the next")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--bad-inputs", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))

    if args.bad_inputs:
        for label, argv, out in bad_inputs(args.workdir):
            record(run_bad(label, argv, out, args.timeout))
        os.chmod(args.workdir / "bad" / "readonly", stat.S_IRWXU)
        return
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    jobs = ([(m, v) for v in variants for m in models] if args.order == "variant" else
            [(m, v) for m in models for v in variants])
    for m in models:  # build serially: two processes must not save the same folder at once
        if not (args.workdir / "models" / m / "config.json").exists():
            build(m, args.workdir / "models" / m)
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(run_one, *j, args.workdir, args.timeout) for j in jobs]
        for future in as_completed(futures):
            record(future.result())


if __name__ == "__main__":
    main()
