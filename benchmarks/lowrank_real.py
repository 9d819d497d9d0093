"""Low-rank factorization and basis sharing on real weights, against structured pruning.

SmolLM2-135M (KJV perplexity; calibration Genesis-Exodus, evaluation the Gospel of John, as
``prune_smollm2.py``) and all-MiniLM-L6-v2 (WordSim-353 Spearman, as ``prune_minilm.py``), at
the same fractions of *all* parameters removed by: plain SVD, whitened SVD (SVD-LLM), ASVD,
basis sharing across adjacent layers, slimc's structured pruning (``budget=params``), and
combinations. The model is captured once; each row runs its pipeline on an ``IR.clone()``.

    python benchmarks/lowrank_real.py smollm2 --threads 1   # -> results/lowrank_smollm2.json
    python benchmarks/lowrank_real.py minilm --threads 1    # -> results/lowrank_minilm.json
    python benchmarks/lowrank_real.py latency --threads 1   # factorized vs dense artifact
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.prune_common import kjv, set_threads, table, write_json  # noqa: E402

#: label -> pipeline; ``{f}`` is the fraction of parameters removed.
PIPELINES = {
    "svd": "lowrank{{method=svd,ratio={f}}}",
    "whiten": "lowrank{{method=whiten,ratio={f}}}",
    "asvd": "lowrank{{method=asvd,ratio={f}}}",
    "whiten-global": "lowrank{{method=whiten,ratio={f},allocation=global}}",
    "whiten-seq": "lowrank{{method=whiten,ratio={f},sequential=true}}",
    "whiten-sens": "lowrank{{method=whiten,ratio={f},allocation=sensitivity}}",
    "whiten-measured": "lowrank{{method=whiten,ratio={f},allocation=measured,damage=kl}}",
    "whiten-measured5": "lowrank{{method=whiten,ratio={f},allocation=measured,damage=kl,"
                        "probe_keeps=0.3|0.4|0.5|0.7|0.9}}",
    "whiten-sens-seq": "lowrank{{method=whiten,ratio={f},allocation=sensitivity,"
                       "sequential=true}}",
    "block-tie": "share{{blocks=true,ratio={f}}}",
    "whiten+emb": "lowrank{{method=whiten,ratio={f},embeddings=true}}",
    "basis-share": "share{{basis=true,ratio={f}}}",
    "prune": "prune{{ratio={f},budget=params,reconstruct=lsq,gqa=query}}",
}


def capture_ir(module: torch.nn.Module, example: dict[str, torch.Tensor]):
    from slimc.capture import capture
    from slimc.loaders.base import LoadedModel

    loaded = LoadedModel(name="bench", module=module, example_inputs=dict(example),
                         as_kwargs=True)
    ir, inputs = capture(loaded)
    ir.remove_unused_weights()
    ir.changed()
    return ir, inputs


def run_pipeline(ir, inputs, calib: list[dict[str, torch.Tensor]], pipeline: str):
    """Run ``pipeline`` on a clone of ``ir`` with ``calib`` as calibration batches."""
    from slimc.passmanager import PassContext, PassManager
    from slimc.pipeline import parse_pipeline_text, validate
    from slimc.plugins import get_registry
    from slimc.targets import resolve_target

    registry = get_registry()
    work = ir.clone()
    ctx = PassContext(example_inputs=inputs, target=resolve_target("llvm", registry),
                      verify=False)
    ctx.calibration_batches = [[b[n] for n in work.input_names] for b in calib]
    t0 = time.perf_counter()
    PassManager(registry.passes).run(work, validate(parse_pipeline_text(pipeline),
                                                    registry.passes), ctx)
    return work, time.perf_counter() - t0


def sweep(name: str, ir, inputs, calib, score, fractions, labels, extra: list[str], out: str,
          meta: dict) -> None:
    dense = ir.num_params()
    metric = meta["metric"]
    rows = [{"method": "dense", "pipeline": "-", "params": dense, "kept": 1.0,
             metric: score(ir), "seconds": 0.0}]
    cols = ["method", "params", "kept", metric, "seconds", "pipeline"]
    print(table(rows, cols), flush=True)
    jobs = [(f"{label} {f:.0%}", PIPELINES[label].format(f=f))
            for f in fractions for label in labels if label]
    jobs += [(f"combo: {p}", p) for p in extra]
    for label, pipeline in jobs:
        try:
            work, secs = run_pipeline(ir, inputs, calib, pipeline)
        except Exception as exc:  # noqa: BLE001 - record the failure and go on
            rows.append({"method": label, "pipeline": pipeline, "error": repr(exc)[:300]})
            print(f"{label}: FAILED {exc!r}"[:400], flush=True)
            continue
        after = work.num_params()
        rows.append({"method": label, "pipeline": pipeline, "params": after,
                     "kept": after / dense, metric: score(work), "seconds": secs,
                     **{k: v for k, v in work.annotations.get("lowrank", {}).items()
                        if k == "allocation"}})
        print(table(rows[-1:], cols), flush=True)
        write_json(out, {**meta, "rows": rows})
        del work
    print()
    print(table([r for r in rows if "error" not in r], cols))
    print(f"wrote {write_json(out, {**meta, 'rows': rows})}")


def smollm2(args) -> None:
    from benchmarks.prune_smollm2 import Logits, chunks, load, perplexity

    tok, model, gguf = load()
    calib = chunks(tok, " ".join(kjv(args.calib)), args.seq, 1, args.calib_tokens)
    evald = chunks(tok, " ".join(kjv("John1:1-21:25")), args.seq, 1, args.eval_tokens)
    ir, inputs = capture_ir(Logits(model).eval(), calib[0])
    del model

    def score(work) -> float:
        return perplexity(lambda b: work.run([b["input_ids"]])[0], evald)

    meta = {"model": f"SmolLM2-135M-Instruct ({gguf}, dequantized to fp32)",
            "metric": "ppl", "threads": args.threads,
            "eval": f"KJV John, {sum(b['input_ids'].numel() for b in evald)} tokens",
            "calibration": f"KJV {args.calib}, "
                           f"{sum(b['input_ids'].numel() for b in calib)} tokens"}
    sweep("smollm2", ir, inputs, calib, score, args.fractions, args.methods, args.combo,
          args.out or "lowrank_smollm2.json", meta)


def minilm(args) -> None:
    from benchmarks.prune_common import wordsim353
    from benchmarks.prune_minilm import batches, load, wordsim_score

    tok, model, select = load()
    pairs = wordsim353()
    verses = kjv(args.calib)
    step = max(1, len(verses) // 256)
    calib = batches(tok, verses[::step][:256])
    wrapped = select(model, "last_hidden_state").eval()
    ir, inputs = capture_ir(wrapped, calib[0])

    def score(work) -> float:
        return wordsim_score(lambda b: work.run([b[n] for n in work.input_names])[0], tok,
                             pairs)

    meta = {"model": "all-MiniLM-L6-v2", "metric": "spearman", "threads": args.threads,
            "eval": "WordSim-353 Spearman (mean-pooled last_hidden_state)",
            "calibration": f"KJV {args.calib}, 256 verses"}
    labels = [m for m in args.methods if m != "whiten+emb"]
    sweep("minilm", ir, inputs, calib, score, args.fractions, labels, args.combo,
          args.out or "lowrank_minilm.json", meta)


def conv_stack():
    """A VGG-style stack of dense 3x3 convolutions (random weights), 1x64x56x56: the layers
    Tucker-2 factorizes (where the target cost model says the factorized form is faster)."""
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [torch.nn.Conv2d(128 if layers else 64, 128, 3, padding=1), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(128, 10)).eval()
    return net, (torch.randn(1, 64, 56, 56),)


#: latency models: name -> (factory, what it is)
LATENCY_MODELS = {
    "llama": ("tests.test_quantize:medium_llama", "hidden 256, MLP 768, 2 layers, seq 16"),
    "minilm": ("benchmarks.models:minilm", "real all-MiniLM-L6-v2, 1x128 tokens"),
    "convs": ("benchmarks.lowrank_real:conv_stack", "four dense 3x3 convs 64/128->128 on "
              "56x56 (random weights), Tucker-2"),
    "cnn": ("benchmarks.models:cnn", "ResNet-18-shaped (random weights), 1x3x224x224; "
            "3x3 convs by Tucker-2, 1x1 convs and the head by SVD"),
}


def latency(args) -> None:
    """Dense vs factorized artifacts, called alternately in one process (the same load).

    Artifacts are compiled once into ``/tmp/slimc_lowrank_latency/<model>/<label>`` and
    reused, so the timing run (``/work/wt/bench.sh``) does not compile."""
    import json

    import numpy as np

    import slimc

    rows_all = {}
    for model in args.latency_models:
        factory, about = LATENCY_MODELS[model]
        out = Path("/tmp/slimc_lowrank_latency") / model
        variants = [("dense", "eliminate-dead-code")]
        variants += [(f"lowrank {f:.0%}", f"lowrank{{method=svd,ratio={f}}}")
                     for f in args.fractions]
        if args.unrounded:
            f = args.fractions[-1]
            variants.append((f"lowrank {f:.0%} round_to=1",
                             f"lowrank{{method=svd,ratio={f},round_to=1}}"))
        models, manifests = {}, {}
        for label, pipeline in variants:
            path = out / label.replace(" ", "_").replace("%", "")
            if not (path / "manifest.json").exists():
                slimc.compile_model(factory, slimc.CompileOptions(
                    pipeline=pipeline, output=path, threads=args.threads))
            manifests[label] = json.loads((path / "manifest.json").read_text())
            models[label] = slimc.load(path)
        if args.repeats <= 1:
            continue
        feeds = {k: m.example_inputs() for k, m in models.items()}
        times = {k: [] for k in models}
        for _ in range(args.repeats):
            for k, m in models.items():  # interleaved: every artifact sees the same load
                t0 = time.perf_counter()
                m(**feeds[k])
                times[k].append(time.perf_counter() - t0)
        med = {k: float(np.median(v)) for k, v in times.items()}
        rows = []
        for k in models:
            summary = next((p.get("summary", {}) for p in manifests[k].get("pipeline", [])
                            if p.get("pass") == "lowrank"), {})
            rows.append({"artifact": k, "median_ms": med[k] * 1e3,
                         "vs_dense": med[k] / med["dense"],
                         "library_bytes": manifests[k]["library_bytes"],
                         "params": manifests[k]["params_after"],
                         "factorized": summary.get("factorized", 0),
                         "skipped_cost_model": sum("cost model" in str(v) for v in
                                                   summary.get("skipped", {}).values())})
        print(f"{model}: {about}")
        print(table(rows, list(rows[0])), flush=True)
        rows_all[model] = {"model": factory, "about": about, "rows": rows}
    if rows_all:
        write_json(args.out or "lowrank_latency.json",
                   {"threads": args.threads, "repeats": args.repeats, "models": rows_all})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=["smollm2", "minilm", "latency"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--calib", default="Genesis1:1-Exodus40:38")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.2, 0.4])
    ap.add_argument("--methods", type=lambda s: s.split(","),
                    default=["svd", "whiten", "asvd", "whiten+emb", "basis-share", "prune"])
    ap.add_argument("--combo", action="append", default=[],
                    help="extra pipelines to run as they are (combinations)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--latency-models", type=lambda s: s.split(","), default=["minilm", "cnn"])
    ap.add_argument("--unrounded", action="store_true",
                    help="latency: also the last fraction with round_to=1")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    {"smollm2": smollm2, "minilm": minilm, "latency": latency}[args.model](args)


if __name__ == "__main__":
    main()
