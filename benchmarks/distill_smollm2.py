"""Recovery by distillation on real weights: SmolLM2-135M after whitened low rank (issue 13/17).

The dense model is captured once; ``lowrank{method=whiten,ratio=0.2}`` (20% of *all*
parameters, as ``lowrank_real.py`` counts) runs on a clone with Genesis-Exodus calibration
text (the compressed IR is cached in ``--ir-cache`` so a second distillation run skips it);
then ``distill`` trains it against the dense IR (``PassContext.original``) on text from
Leviticus-Deuteronomy (disjoint from the low-rank calibration text and from the evaluation
text), and perplexity is measured on the Gospel of John before and after (the same tokens as
the low-rank rows of docs/benchmarks.md).

    /work/wt/memlock.sh python benchmarks/distill_smollm2.py --threads 1 \\
        --distill 'distill{trainable=factors,lr=1e-4}' --minutes 25

``--minutes`` sizes ``steps`` from one timed training step (teacher forward + student
forward/backward), unless the pipeline gives ``steps`` itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.prune_common import kjv, set_threads, write_json  # noqa: E402


def timed_step(ir, dense, batch) -> float:
    """Seconds of one distillation step (teacher forward, student forward + backward)."""
    from slimc.passes.analysis.criteria.execution import run_with_grad

    leaves = {name: w.detach().clone().requires_grad_(True)
              for name, w in ir.weights().items() if w.is_floating_point() and w.dim() == 2}
    t0 = time.perf_counter()
    ref = dense.run(batch)[0]
    out = run_with_grad(ir, batch, leaves)[0]
    torch.nn.functional.kl_div(torch.log_softmax(out.float(), -1),
                               torch.log_softmax(ref.float(), -1), log_target=True,
                               reduction="batchmean").backward()
    seconds = time.perf_counter() - t0
    del leaves, out, ref
    return seconds


def spread_chunks(tok, text: str, seq: int, n_tokens: int) -> list[dict[str, torch.Tensor]]:
    """``n_tokens // seq`` sequences of ``seq`` tokens at even strides over all of ``text``, so a
    long text (many books) is sampled throughout instead of only its beginning (the same
    sampling as ``slimc compile --calib``)."""
    from slimc.calibration import window_starts

    ids = tok(text, return_tensors="pt")["input_ids"][0]
    starts = window_starts(len(ids), seq, max(1, n_tokens // seq))
    return [{"input_ids": ids[s:s + seq].unsqueeze(0)} for s in starts]


def main() -> None:
    from benchmarks.lowrank_real import capture_ir, run_pipeline
    from benchmarks.prune_smollm2 import Logits, chunks, load, perplexity
    from slimc.ir import IR
    from slimc.passmanager import PassContext, PassManager
    from slimc.pipeline import parse_pipeline_text, validate
    from slimc.plugins import get_registry
    from slimc.targets import resolve_target

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lowrank", default="lowrank{method=whiten,ratio=0.2}")
    ap.add_argument("--lowrank-calib", default="Genesis1:1-Exodus40:38")
    ap.add_argument("--lowrank-tokens", type=int, default=4096)
    ap.add_argument("--distill", default="distill{trainable=factors,lr=1e-4}")
    ap.add_argument("--distill-text", default="Leviticus1:1-Deuteronomy34:12",
                    help="KJV verse ranges, several joined by '+' (e.g. the Bible without John: "
                         "Genesis1:1-Luke24:53+Acts1:1-Revelation22:21)")
    ap.add_argument("--distill-spread", action="store_true",
                    help="take the --distill-tokens as sequences spread evenly over the whole "
                         "text (default: its first tokens)")
    ap.add_argument("--distill-tokens", type=int, default=10240)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--ir-cache", default="/tmp/slimc_distill/smollm2_lowrank.pt2")
    ap.add_argument("--out", default="distill_smollm2.json")
    ap.add_argument("--curve-points", type=int, default=8,
                    help="John perplexity and held-out KL this many times during training "
                         "(distill's eval_every; 0: only before and after)")
    ap.add_argument("--teacher-cache-gb", type=float, default=0.5,
                    help="distill's teacher-logit cache (fp16): 25 MB per 256-token sequence")
    ap.add_argument("--prepare-only", action="store_true",
                    help="compress and cache the IR (--ir-cache), then stop")
    args = ap.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)

    tok, model, gguf = load()
    lr_calib = chunks(tok, " ".join(kjv(args.lowrank_calib)), args.seq, 1, args.lowrank_tokens)
    train_text = " ".join(v for spec in args.distill_text.split("+") for v in kjv(spec))
    if args.distill_spread:
        train = spread_chunks(tok, train_text, args.seq, args.distill_tokens)
    else:
        train = chunks(tok, train_text, args.seq, 1, args.distill_tokens)
    evald = chunks(tok, " ".join(kjv("John1:1-21:25")), args.seq, 1, args.eval_tokens)
    dense, inputs = capture_ir(Logits(model).eval(), lr_calib[0])
    del model

    def score(work) -> float:
        return perplexity(lambda b: work.run([b["input_ids"]])[0], evald)

    rows = []
    t0 = time.perf_counter()
    rows.append({"model": "dense", "params": dense.num_params(), "ppl": score(dense)})
    print(rows[-1], f"({time.perf_counter() - t0:.0f}s)", flush=True)
    cache = Path(args.ir_cache)
    key = f"{args.lowrank}|{args.lowrank_calib}|{args.lowrank_tokens}|{args.seq}"
    if cache.exists() and cache.with_suffix(".key").read_text() == key:
        compressed, secs = IR.load(cache), 0.0
    else:
        compressed, secs = run_pipeline(dense, inputs, lr_calib, args.lowrank)
        cache.parent.mkdir(parents=True, exist_ok=True)
        compressed.save(cache)
        cache.with_suffix(".key").write_text(key)
    if args.prepare_only:
        print(f"cached {cache} ({secs:.0f}s)", flush=True)
        return
    rows.append({"model": args.lowrank, "params": compressed.num_params(),
                 "ppl": score(compressed), "seconds": secs})
    print(rows[-1], flush=True)
    write_json(args.out, {"rows": rows})

    registry = get_registry()
    pipeline = validate(parse_pipeline_text(args.distill), registry.passes)
    options = pipeline[0].options
    step_s = timed_step(compressed, dense, [train[0]["input_ids"]])
    text = args.distill
    if "steps=" not in text:
        # evaluations (curve points) cost about as much as one step each
        steps = max(1, int(args.minutes * 60 / (step_s * options.batch * 1.1))
                    - args.curve_points)
        text = text.replace("distill{", f"distill{{steps={steps},")
    steps_now = validate(parse_pipeline_text(text), registry.passes)[0].options.steps
    if args.curve_points and "eval_every=" not in text:
        text = text.replace("distill{", f"distill{{eval_every="
                            f"{max(1, steps_now // args.curve_points)},")
    pipeline = validate(parse_pipeline_text(text), registry.passes)
    print(f"one step {step_s:.1f}s; running {pipeline[0]}", flush=True)
    import slimc.passes.distill.distill as distill_mod

    distill_mod.TEACHER_CACHE_BYTES = int(args.teacher_cache_gb * (1 << 30))
    curve: list[dict] = []
    t_train = time.perf_counter()

    def probe(step: int, run) -> None:
        ppl = perplexity(lambda b: run([b["input_ids"]])[0], evald)
        curve.append({"step": step, "ppl": ppl, "wall_s": round(time.perf_counter() - t_train)})
        print(f"curve: step {step} John ppl {ppl:.2f} ({curve[-1]['wall_s']}s)", flush=True)
        write_json(args.out, {"rows": rows, "ppl_curve": curve})

    ctx = PassContext(example_inputs=inputs, target=resolve_target("llvm", registry),
                      verify=False, log=lambda m: print(m, flush=True))
    ctx.calibration_batches = [[b["input_ids"]] for b in train]
    ctx.original = dense
    ctx.memo[distill_mod.PROBE_KEY] = probe
    t0 = time.perf_counter()
    PassManager(registry.passes).run(compressed, pipeline, ctx)
    secs = time.perf_counter() - t0
    summary = compressed.annotations["distill"]
    rows.append({"model": f"{args.lowrank} + {pipeline[0]}", "params": compressed.num_params(),
                 "ppl": score(compressed), "seconds": secs,
                 "held_out_kl_before": summary["held_out_loss_before"],
                 "held_out_kl_after": summary["held_out_loss_after"],
                 "train_batches": summary["train_batches"],
                 "train_tokens_seen": summary["train_tokens_seen"]})
    print(rows[-1], flush=True)
    meta = {"model": f"SmolLM2-135M-Instruct ({gguf}, dequantized to fp32)",
            "threads": args.threads, "seq": args.seq, "step_seconds": step_s,
            "eval": f"KJV John, {sum(b['input_ids'].numel() for b in evald)} tokens",
            "lowrank_calibration": f"KJV {args.lowrank_calib}, "
                                   f"{sum(b['input_ids'].numel() for b in lr_calib)} tokens",
            "distill_data": f"KJV {args.distill_text}"
                            f"{' (sequences spread evenly)' if args.distill_spread else ''}, "
                            f"{sum(b['input_ids'].numel() for b in train)} tokens "
                            f"({summary['held_out_batches']} batches held out)",
            "teacher_cache_bytes": distill_mod.TEACHER_CACHE_BYTES,
            "distill_summary": summary}
    print(f"wrote {write_json(args.out, {**meta, 'rows': rows, 'ppl_curve': curve})}")


if __name__ == "__main__":
    main()
