"""Post-training levers of whitened SVD on SmolLM2-135M not measured by ``lowrank_levers.py``.

Same setup (the transformers model itself, ``XᵀX`` by forward hooks, the rank-r product written
back into each linear, 20% of *all* parameters removed unless said), one row per lever:

* **calibration size beyond 16k tokens**: Grams accumulated over 4k, 16k, 32k, ... tokens of
  Genesis-Exodus (the largest lever measured so far: 12.1x -> 4.8x -> 3.8x dense for 1k, 4k,
  16k tokens);
* **closed-form refit of the second factor** ``U`` given ``V`` on the calibration Grams:
  ``U = W G Vᵀ (V G Vᵀ)⁻¹``; asserted to change nothing measurable (the truncated whitened SVD
  is already the optimal rank-r map in ``‖(W − W')Xᵀ‖``), so that lever only exists with
  *other* inputs than the ones whitened on (the pass's ``sequential=true``);
* **rank allocation by measured damage at several ranks** (the fix that round 2 named for
  ``allocation=sensitivity``'s one-probe extrapolation): each group (one matrix kind in a band of
  blocks) truncated alone to each of several kept fractions, ΔNLL measured on held-out text;
  then per group the kept fraction that minimises the summed ΔNLL under the parameter budget
  (Lagrangian multiple-choice knapsack, ΔNLL assumed additive across groups; 1.0 = dense).

    python benchmarks/lowrank_levers2.py --threads 1 --calib-tokens 4096,16384,49152
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.lowrank_levers import (  # noqa: E402
    GRAM_OF,
    Factorizer,
    groups,
    linears,
    nll,
    rank_for_keep,
    uniform_ranks,
)
from benchmarks.prune_common import kjv, write_json  # noqa: E402


class Grams:
    """``XᵀX`` (float64) of every distinct linear input, accumulated batch by batch."""

    def __init__(self, model) -> None:
        self.model, self.sums, self.tokens = model, {}, 0
        self.mods = linears(model)

    @torch.no_grad()
    def add(self, batches) -> None:
        hooks = []

        def hook(name):
            def fn(_mod, args):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                self.sums[name] = self.sums.get(name, 0) + x.T @ x
            return fn

        for name, mod in self.mods.items():
            if name.split(".")[1] not in GRAM_OF:
                hooks.append(mod.register_forward_pre_hook(hook(name)))
        for b in batches:
            self.model(input_ids=b, use_cache=False)
            self.tokens += b.numel()
        for h in hooks:
            h.remove()

    def full(self) -> dict[str, torch.Tensor]:
        g = dict(self.sums)
        for name in self.mods:
            i, kind = name.split(".")
            if kind in GRAM_OF:
                g[name] = g[f"{i}.{GRAM_OF[kind]}"]
        return g


def lsq_refit_change(fz: Factorizer, grams, name: str, rank: int) -> dict:
    """Relative change of the whitened output loss when ``U`` is refit in closed form."""
    w = fz.dense[name].double()
    g = grams[name]
    u, s, vh = (t.double() for t in fz.spec[name])
    a, b = u[:, :rank] * s[:rank], vh[:rank]
    refit = w @ g @ b.T @ torch.linalg.inv(b @ g @ b.T)

    def loss(m):
        d = w - m
        return float(torch.einsum("ij,jk,ik->", d, g, d))

    before, after = loss(a @ b), loss(refit @ b)
    return {"layer": name, "rank": rank, "loss_svd": before, "loss_refit": after,
            "rel_change": (before - after) / before}


def knapsack(options: dict[str, list[tuple[float, float, float]]], goal: float):
    """Per group one (keep, removed params, damage) choice, summed removed >= goal, summed
    damage minimal: bisect the price λ of a parameter (each group: argmin damage − λ·removed)."""
    def pick(lam):
        return {g: min(opts, key=lambda o: o[2] - lam * o[1]) for g, opts in options.items()}

    lo, hi = 0.0, 1.0
    while sum(o[1] for o in pick(hi).values()) < goal and hi < 1e6:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if sum(o[1] for o in pick(mid).values()) >= goal else (mid, hi)
    return pick(hi)


def main() -> None:
    from benchmarks.prune_smollm2 import load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--calib-tokens", default="4096,16384,49152")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--sens-tokens", type=int, default=512)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--band", type=int, default=10)
    ap.add_argument("--probe-keeps", default="0.45,0.6,0.75,0.9")
    ap.add_argument("--out", default="lowrank_levers2.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = [int(x) for x in args.calib_tokens.split(",")]

    tok, model, gguf = load()

    def ids_of(spec: str, n_tokens: int) -> list[torch.Tensor]:
        ids = tok(" ".join(kjv(spec)), return_tensors="pt")["input_ids"][0]
        n = min(len(ids) // args.seq, n_tokens // args.seq)
        return list(ids[: n * args.seq].reshape(n, args.seq).split(1))

    calib = ids_of("Genesis1:1-Exodus40:38", max(sizes))
    sens = ids_of("Numbers1:1-36:13", args.sens_tokens)  # neither calibration nor John
    evald = ids_of("John1:1-21:25", args.eval_tokens)
    t0 = time.time()
    dense_params = sum(p.numel() for p in model.parameters())
    linear_params = sum(m.weight.numel() for m in linears(model).values())
    base = math.exp(nll(model, evald))
    goal = args.fraction * dense_params
    meta = {"model": gguf, "dense_ppl": base, "eval": f"John, {len(evald) * args.seq} tokens",
            "calibration": f"Genesis-Exodus, available {len(calib) * args.seq} tokens",
            "fraction_of_all": args.fraction, "threads": args.threads}
    rows: list[dict] = []
    print(f"dense ppl {base:.3f}; {dense_params:,} params; {time.time() - t0:.0f}s", flush=True)

    def row(label, fz, ranks, **extra):
        removed = fz.apply(ranks)
        ppl = math.exp(nll(model, evald))
        fz.apply({})
        rows.append({"lever": label, "removed_of_all": removed / dense_params,
                     "removed_of_linears": removed / linear_params, "ppl": ppl,
                     "x_dense": ppl / base, "seconds": round(time.time() - t0), **extra})
        print(f"{label:58s} removed {removed / dense_params:6.2%} of all  ppl {ppl:8.2f} "
              f"({ppl / base:5.2f}x) t={time.time() - t0:.0f}s", flush=True)
        write_json(args.out, {**meta, "rows": rows})

    grams = Grams(model)
    done = 0
    fz = None
    for size in sizes:
        n = min(len(calib), size // args.seq)
        grams.add(calib[done:n])
        done = n
        fz = Factorizer(model, grams.full(), None)
        row(f"uniform whitened, calib {grams.tokens} tokens", fz, uniform_ranks(fz, goal),
            calib_tokens=grams.tokens)
        if size != sizes[-1]:
            del fz
    full = grams.full()
    uniform = uniform_ranks(fz, goal)
    checks = [lsq_refit_change(fz, full, name, uniform[name])
              for name in ("3.q_proj", "15.down_proj", "28.o_proj")]
    print(f"closed-form U refit on the same Grams: {checks}", flush=True)
    del full, grams
    meta["lsq_refit_checks"] = checks

    # allocation by measured damage at several kept fractions per group
    keeps = [float(x) for x in args.probe_keeps.split(",")]
    base_sens = nll(model, sens)
    grps = groups(len(model.model.layers), args.band)
    options: dict[str, list[tuple[float, float, float]]] = {}
    probe = {}
    for g, names in grps.items():
        opts = [(1.0, 0.0, 0.0)]
        for keep in keeps:
            ranks = {n: rank_for_keep(*fz.shape(n), keep) for n in names}
            removed = fz.apply(ranks)
            delta = nll(model, sens) - base_sens
            opts.append((keep, float(removed), delta))
        fz.apply({})
        options[g] = opts
        probe[g] = {f"{k}": round(d, 5) for k, _, d in opts[1:]}
        print(f"  damage {g:14s} " + " ".join(f"{k}:{d:+.4f}" for k, _, d in opts[1:])
              + f"  t={time.time() - t0:.0f}s", flush=True)
    meta["group_damage"] = probe
    chosen = knapsack(options, goal)
    ranks = {n: rank_for_keep(*fz.shape(n), chosen[g][0]) for g, names in grps.items()
             for n in names if chosen[g][0] < 1.0}
    row(f"measured-damage allocation ({len(keeps)} probes/group, band {args.band})", fz,
        ranks, keeps={g: c[0] for g, c in chosen.items()},
        predicted_dnll=sum(c[2] for c in chosen.values()))
    # the knapsack's additive prediction vs uniform's, for reading the row
    write_json(args.out, {**meta, "rows": rows})


if __name__ == "__main__":
    main()
