"""Why whitened SVD loses so much on SmolLM2-135M: one lever at a time, on the HF model itself.

SVD-LLM's levers are measured here directly on the transformers model (forward hooks collect
every linear's ``XᵀX``; factorized weights are written back as the rank-r product), so each row
costs one factorization and one perplexity evaluation instead of a whole slimc pipeline:

* calibration size (tokens in ``XᵀX``);
* the truncation-aware identity ``‖(W − W')Xᵀ‖² = Σ_{i>r} σ_i²`` (asserted on one layer);
* the rank allocation: uniform (SVD-LLM v1) vs per-group ranks from *measured* sensitivity
  (each group of layers, one matrix kind in a band of blocks, truncated alone on held-out
  calibration text; the ranks that minimise the summed predicted damage under the parameter
  budget, as ASVD's sensitivity search and SVD-LLM v2's heterogeneous ranks do);
* the tied 49152x576 embedding / output head factorized, whitened on the head's inputs;
* how "20% fewer" is counted: of all parameters (pruning's 51.55 row) or of the linear
  layers only (SVD-LLM's convention, which never touches the embedding).

The allocation found is printed as a ``lowrank{ranks=...}`` option, so the same factorization
can be run through the real pass (``lowrank_real.py smollm2 --combo ...``).

    python benchmarks/lowrank_levers.py --threads 2 --calib-tokens 16384
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.prune_common import kjv, write_json  # noqa: E402

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: modules whose input is shared: one Gram each
GRAM_OF = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def linears(model) -> dict[str, torch.nn.Linear]:
    return {f"{i}.{kind}": getattr(layer.self_attn if "proj" in kind and kind[0] in "qkvo"
                                   else layer.mlp, kind)
            for i, layer in enumerate(model.model.layers) for kind in KINDS}


@torch.no_grad()
def collect_grams(model, batches, snapshot: int = 0):
    """``XᵀX`` (float64) of every distinct linear input, and of the head's input; with
    ``snapshot``, also the same sums after the first ``snapshot`` batches."""
    mods = linears(model)
    grams: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def fn(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return fn

    for name, mod in mods.items():
        if name.split(".")[1] not in GRAM_OF:
            hooks.append(mod.register_forward_pre_hook(hook(name)))
    hooks.append(model.lm_head.register_forward_pre_hook(hook("lm_head")))
    tokens, early = 0, None

    def finish(g):
        g = dict(g)
        for name in mods:
            i, kind = name.split(".")
            if kind in GRAM_OF:
                g[name] = g[f"{i}.{GRAM_OF[kind]}"]
        return g, g.pop("lm_head")

    for step, b in enumerate(batches, 1):
        model(input_ids=b, use_cache=False)
        tokens += b.numel()
        if step == snapshot:
            early = (*finish({k: v.clone() for k, v in grams.items()}), tokens)
    for h in hooks:
        h.remove()
    return (*finish(grams), tokens), early


def whitened_spectrum(weight: torch.Tensor, gram: torch.Tensor):
    """SVD-LLM: ``W S = U Σ Vᵀ`` with ``S Sᵀ = XᵀX`` (+ tiny ridge); returns U, σ, Vᵀ S⁻¹."""
    from slimc.passes.lowrank.factorize import whitened

    sp = whitened(weight, gram)
    return sp.u, sp.s, sp.vh


def check_truncation_aware(weight, gram, x, rank) -> dict:
    """Assert ``‖(W − W')Xᵀ‖² == Σ_{i>r} σ_i²`` on real activations ``x``."""
    u, s, vh = whitened_spectrum(weight, gram)
    approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
    loss = float(((weight.double() - approx) @ x.double().T).square().sum())
    predicted = float(s[rank:].square().sum())
    assert abs(loss - predicted) <= 1e-6 * max(predicted, 1.0) + 1e-3 * predicted, \
        (loss, predicted)
    return {"measured": loss, "predicted": predicted, "rel_diff": abs(loss - predicted)
            / predicted}


def rank_for_keep(n: int, k: int, keep: float, round_to: int = 8) -> int:
    r = int(keep * n * k / (n + k)) // round_to * round_to
    return max(round_to, r)


@torch.no_grad()
def nll(model, data) -> float:
    total, count = 0.0, 0
    for ids in data:
        logits = model(input_ids=ids, use_cache=False).logits.float()
        total += float(torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
            reduction="sum"))
        count += ids[:, 1:].numel()
    return total / count


class Factorizer:
    """Holds the dense weights and spectra; writes any rank assignment into the model."""

    def __init__(self, model, grams, head_gram):
        self.model = model
        self.mods = linears(model)
        self.dense = {n: m.weight.detach().clone() for n, m in self.mods.items()}
        self.embed = model.model.embed_tokens.weight.detach().clone()
        self.spec = {}
        with torch.no_grad():
            for name in self.mods:
                u, s, vh = whitened_spectrum(self.dense[name], grams[name])
                self.spec[name] = (u.float(), s.float(), vh.float())
        self.head_gram = head_gram
        self.head_spec = None

    def shape(self, name) -> tuple[int, int]:
        return tuple(self.dense[name].shape)

    def loss(self, name, r) -> float:
        return float(self.spec[name][1][r:].double().square().sum())

    @torch.no_grad()
    def apply(self, ranks: dict[str, int], embed_rank: int | None = None) -> int:
        """Write rank-``ranks[name]`` weights (dense elsewhere); returns params removed."""
        removed = 0
        for name, mod in self.mods.items():
            r = ranks.get(name)
            if r is None:
                mod.weight.copy_(self.dense[name])
                continue
            u, s, vh = self.spec[name]
            mod.weight.copy_((u[:, :r] * s[:r]) @ vh[:r])
            n, k = self.shape(name)
            removed += n * k - r * (n + k)
        table = self.model.model.embed_tokens.weight
        if embed_rank is None:
            table.copy_(self.embed)
        else:
            if self.head_spec is None:  # whitened on the head's inputs (the tied table)
                u, s, vh = whitened_spectrum(self.embed, self.head_gram)
                self.head_spec = (u.float(), s.float(), vh.float())
            u, s, vh = self.head_spec
            table.copy_((u[:, :embed_rank] * s[:embed_rank]) @ vh[:embed_rank])
            n, k = self.embed.shape
            removed += n * k - embed_rank * (n + k)
        return removed


def uniform_ranks(fz: Factorizer, goal: float, names=None) -> dict[str, int]:
    """SVD-LLM v1: every layer keeps the same fraction of its parameters (bisected)."""
    names = list(names or fz.mods)
    lo, hi = 0.0, 1.0
    for _ in range(40):
        keep = (lo + hi) / 2
        ranks = {n: rank_for_keep(*fz.shape(n), keep) for n in names}
        removed = sum(fz.shape(n)[0] * fz.shape(n)[1] - r * sum(fz.shape(n))
                      for n, r in ranks.items())
        lo, hi = (keep, hi) if removed > goal else (lo, keep)
    return {n: rank_for_keep(*fz.shape(n), lo) for n in names}


def groups(n_layers: int, band: int) -> dict[str, list[str]]:
    return {f"{kind}@{b}": [f"{i}.{kind}" for i in range(b, min(n_layers, b + band))]
            for kind in KINDS for b in range(0, n_layers, band)}


def measure_weights(fz: Factorizer, grps, probe_keep: float, sens_data, base: float) -> dict:
    """Per group: Δ(mean NLL) when only that group is truncated to ``probe_keep`` of its
    parameters, divided by the predicted output loss Σσ² of that truncation: the price of one
    unit of that group's output error in the model's loss."""
    out = {}
    for g, names in grps.items():
        ranks = {n: rank_for_keep(*fz.shape(n), probe_keep) for n in names}
        fz.apply(ranks)
        delta = nll(fz.model, sens_data) - base
        predicted = sum(fz.loss(n, r) for n, r in ranks.items())
        out[g] = max(delta, 1e-6) / max(predicted, 1e-30)
        print(f"  sensitivity {g:14s} dNLL {delta:+.4f} -> weight {out[g]:.3e}", flush=True)
    fz.apply({})
    return out


def weighted_ranks(fz: Factorizer, weight_of: dict[str, float], goal: float,
                   round_to: int = 8) -> dict[str, int]:
    """Minimise Σ_l w_l Σ_{i>r_l} σ_{l,i}² subject to the removed parameters >= ``goal``:
    remove rank blocks (``round_to`` directions) in the order of least weighted damage per
    parameter saved (greedy on each layer's convex tail), a layer only while its rank keeps
    ``r·(N+K) < N·K``; a layer never reaching that stays dense."""
    import heapq

    state = {}
    heap = []
    for name in fz.mods:
        n, k = fz.shape(name)
        full = min(n, k)
        r0 = int(n * k / (n + k)) // round_to * round_to  # largest useful rank
        state[name] = {"r": full, "r0": r0}
        # first step: going from dense to r0 saves n*k - r0*(n+k), costs loss(r0)
        saved = n * k - r0 * (n + k)
        cost = weight_of[name] * fz.loss(name, r0)
        heapq.heappush(heap, (cost / max(saved, 1), name, r0, saved))
    removed = 0
    while heap and removed < goal:
        _, name, r_new, saved = heapq.heappop(heap)
        st = state[name]
        removed += saved
        st["r"] = r_new
        if r_new - round_to >= round_to:
            nxt = r_new - round_to
            n, k = fz.shape(name)
            cost = weight_of[name] * (fz.loss(name, nxt) - fz.loss(name, r_new))
            heapq.heappush(heap, (cost / (round_to * (n + k)), name, nxt, round_to * (n + k)))
    return {n: st["r"] for n, st in state.items() if st["r"] < min(fz.shape(n))}


def removed_by(fz, ranks, embed_rank=None) -> int:
    total = sum(fz.shape(n)[0] * fz.shape(n)[1] - r * sum(fz.shape(n)) for n, r in ranks.items())
    if embed_rank:
        n, k = fz.embed.shape
        total += n * k - embed_rank * (n + k)
    return total


def main() -> None:
    from benchmarks.prune_smollm2 import load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--small-calib-tokens", type=int, default=2048)
    ap.add_argument("--sens-tokens", type=int, default=1024)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.2])
    ap.add_argument("--band", type=int, default=5)
    ap.add_argument("--probe-keep", type=float, default=0.6)
    ap.add_argument("--embed-ranks", type=lambda s: [int(x) for x in s.split(",")],
                    default=[384, 256])
    ap.add_argument("--out", default="lowrank_levers.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tok, model, gguf = load()
    model.config.use_cache = False

    def ids_of(spec: str, n_tokens: int, skip_tokens: int = 0) -> list[torch.Tensor]:
        ids = tok(" ".join(kjv(spec)), return_tensors="pt")["input_ids"][0][skip_tokens:]
        n = min(len(ids) // args.seq, n_tokens // args.seq)
        return list(ids[: n * args.seq].reshape(n, args.seq).split(1))

    calib = ids_of("Genesis1:1-Exodus40:38", args.calib_tokens)
    # sensitivity is measured on calibration-side text the Grams did not see
    sens = ids_of("Leviticus1:1-27:34", args.sens_tokens)
    evald = ids_of("John1:1-21:25", args.eval_tokens)
    rows, t0 = [], time.time()
    dense_params = sum(p.numel() for p in model.parameters())
    linear_params = sum(m.weight.numel() for m in linears(model).values())
    base_eval = nll(model, evald)
    base_sens = nll(model, sens)
    print(f"dense: ppl {math.exp(base_eval):.3f} ({dense_params:,} params, linears "
          f"{linear_params:,}); {time.time() - t0:.0f}s", flush=True)

    def row(label, fz, ranks, embed_rank=None, **extra):
        removed = fz.apply(ranks, embed_rank)
        ppl = math.exp(nll(model, evald))
        fz.apply({})
        rows.append({"lever": label, "removed_of_all": removed / dense_params,
                     "removed_of_linears": removed / linear_params, "ppl": ppl,
                     "x_dense": ppl / math.exp(base_eval), **extra})
        print(f"{label:60s} removed {removed / dense_params:6.1%} of all "
              f"({removed / linear_params:6.1%} of linears)  ppl {ppl:9.2f} "
              f"({ppl / math.exp(base_eval):5.2f}x)  t={time.time() - t0:.0f}s", flush=True)
        write_json(args.out, {"model": gguf, "dense_ppl": math.exp(base_eval),
                              "calib_tokens": args.calib_tokens, "rows": rows})

    small = calib[: max(1, args.small_calib_tokens // args.seq)]
    (grams, head_gram, ntok), (grams_s, head_s, ntok_s) = collect_grams(model, calib,
                                                                        len(small))
    print(f"Grams of {ntok} and {ntok_s} tokens; t={time.time() - t0:.0f}s", flush=True)
    fz_small = Factorizer(model, grams_s, head_s)
    del grams_s
    # truncation-aware whitening: the measured output loss equals the dropped σ² (layer 3 q)
    acts: list[torch.Tensor] = []
    h = linears(model)["3.q_proj"].register_forward_pre_hook(
        lambda _m, a: acts.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in calib[:2]:
            model(input_ids=b, use_cache=False)
    h.remove()
    xs = torch.cat(acts).double()
    check = check_truncation_aware(linears(model)["3.q_proj"].weight.detach(), xs.T @ xs, xs,
                                   216)
    del xs
    print(f"truncation-aware check (3.q_proj, rank 216): {check}", flush=True)
    fz = Factorizer(model, grams, head_gram)
    del grams
    for f in args.fractions:
        goal_all = f * dense_params
        row(f"uniform, {f:.0%} of all, calib {ntok_s} tok", fz_small,
            uniform_ranks(fz_small, goal_all))
        row(f"uniform, {f:.0%} of all, calib {ntok} tok", fz, uniform_ranks(fz, goal_all))
        row(f"uniform, {f:.0%} of linears (SVD-LLM count), calib {ntok} tok", fz,
            uniform_ranks(fz, f * linear_params))
        for er in args.embed_ranks:
            left = goal_all - removed_by(fz, {}, er)
            row(f"embedding/head rank {er} (head-whitened) + uniform, {f:.0%} of all", fz,
                uniform_ranks(fz, left), er)
    del fz_small
    # measured sensitivity per group (matrix kind x band of blocks)
    grps = groups(len(model.model.layers), args.band)
    weights_g = measure_weights(fz, grps, args.probe_keep, sens, base_sens)
    weight_of = {n: weights_g[g] for g, names in grps.items() for n in names}
    for f in args.fractions:
        goal_all = f * dense_params
        ranks = weighted_ranks(fz, weight_of, goal_all)
        row(f"sensitivity-weighted ranks, {f:.0%} of all", fz, ranks,
            rank_plan=dict(ranks))
        for er in args.embed_ranks:
            left = goal_all - removed_by(fz, {}, er)
            ranks_e = weighted_ranks(fz, weight_of, left)
            row(f"embedding rank {er} + sensitivity-weighted, {f:.0%} of all", fz, ranks_e,
                er, rank_plan=ranks_e)
    write_json(args.out, {"model": gguf, "dense_ppl": math.exp(base_eval),
                          "calib_tokens": ntok, "truncation_check": check,
                          "group_weights": weights_g, "rows": rows})
    print(json.dumps([{k: v for k, v in r.items() if k != "rank_plan"} for r in rows], indent=1))


if __name__ == "__main__":
    main()
