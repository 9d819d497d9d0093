"""Recovery by distillation inside the budget search (issue 17).

When no candidate meets ``--max-drop`` after the back-off rounds, the search tries the closest
candidates (the lowest measured drop within the budget, :data:`.search.DISTILL_CANDIDATES` of
them) again with ``distill{steps=N,lr=...}`` in their pipeline: the compressed weights are
trained against the original model on the ``--calib`` batches, and the candidate is measured
again. ``N`` is sized from a measured step time and the time left of ``--distill-budget``: a
short probe (:data:`.search.DISTILL_PROBE_STEPS` steps of the real pass on a clone) times one
step, and the step count is what fits after the probe, one candidate build and the pass's own
held-out evaluations, at most :data:`.search.DISTILL_MAX_EPOCHS` passes over the training
batches (more memorises a small calibration set) and :data:`.search.DISTILL_MAX_STEPS`.

Where ``distill`` goes: before ``quantize`` when the candidate prunes or factorizes (the
structural changes are what lost function, and the quantizer then rounds the trained weights:
exactly what a recipe reproduces), after it otherwise (a precision-only candidate equals the
teacher before ``quantize``, so there is nothing to learn there; after it, the float weights
that remain -- norms, fp32 layers, embeddings left in fp32 -- learn to absorb the rounding).

What "held out" means: with ``--eval-data`` the task metric on that data (disjoint from
``--calib``); without it the proxy is measured on the calibration batches the distill pass
holds out of training (its last ``holdout`` share), for the candidate before and after, so
the drop it reports is not one the training saw. Distillation is not tried -- and the search
says why -- when it is disabled (``--distill-budget 0``), there are fewer than 2 calibration
batches, the budget is too short for :data:`.search.DISTILL_MIN_STEPS` steps, or the pass
cannot train the model (no float output kept its shape, nothing trainable).
"""

from __future__ import annotations

import time
from typing import Any

from slimc.errors import UsageError

from .search import (
    DISTILL_CANDIDATES,
    DISTILL_LR,
    DISTILL_MAX_EPOCHS,
    DISTILL_MAX_STEPS,
    DISTILL_MIN_STEPS,
    DISTILL_PROBE_STEPS,
    Candidate,
    Scorer,
    Search,
    pipeline_text,
    proxy_scorer,
)

#: The distill pass's default share of calibration batches held out of training.
HOLDOUT = 0.25
#: Distillation placed after ``quantize`` also trains the quantized weights' float grids
#: (``distill{scales=true}``: group scales / minimums, int8 row scales; codes and bytes stay).
#: Measured on MiniLM / WordSim-353 against the float weights alone at the same steps and
#: bytes (docs/benchmarks.md, "wt/search20"; ``benchmarks/recovery_scales_minilm.py``).
TRAIN_SCALES = True


def unavailable(search: Search, seconds: float) -> str | None:
    """Why distillation cannot be tried at all (None: it can)."""
    if seconds <= 0:
        return "distillation is disabled (--distill-budget 0)"
    count = len(search.ctx.calibration_batches)
    if count < 2:
        return (f"distillation trains on --calib data and checks the result on batches of it "
                f"held out of training, so it needs --calib with at least 2 batches "
                f"(got {count})")
    return None


def held_out_batches(search: Search) -> list[list[Any]]:
    """The calibration batches ``distill`` never trains on (as the pass splits them)."""
    batches = [list(b) for b in search.ctx.calibration_batches]
    held = min(max(1, round(HOLDOUT * len(batches))), len(batches) - 1)
    return batches[len(batches) - held:]


def with_distill(rest: list[tuple[str, dict[str, Any]]], options: dict[str, Any],
                 pruned: bool = False, scales: bool | None = None
                 ) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """``rest`` (a candidate's pipeline after pruning) with ``distill{options}`` inserted,
    and its position (see the module docstring for where and why). After ``quantize`` the
    pass also trains the quantized weights' float grids (``scales=true``) unless ``scales``
    (default :data:`TRAIN_SCALES`) says not to."""
    names = [name for name, _ in rest]
    options = dict(options)
    if (pruned or "lowrank" in names) and "quantize" in names:
        at = names.index("quantize")
    else:
        at = names.index("eliminate-dead-code") if "eliminate-dead-code" in names \
            else len(rest)
        if "quantize" in names[:at] and (TRAIN_SCALES if scales is None else scales):
            options["scales"] = True
    return rest[:at] + [("distill", options)] + rest[at:], at


def recover(search: Search, limits: dict[str, float], max_drop: float, seconds: float,
            keep: bool = True) -> tuple[Candidate | None, dict[str, Any]]:
    """Distil the closest measured candidates within ``limits``; the first whose held-out drop
    is within ``max_drop`` is returned (with the entry the manifest records), else None."""
    info: dict[str, Any] = {"tried": False, "budget_seconds": seconds, "attempts": []}
    why = unavailable(search, seconds)
    if why is not None:
        info["why_not"] = why
        return None, info
    seen, pool = set(), []
    for c in sorted(search.measured, key=lambda c: c.drop):
        key = str(c.items)
        if c.distill is None and key not in seen and search._within(c, limits) \
                and c.drop > max_drop:
            seen.add(key)
            pool.append(c)
    pool = pool[:DISTILL_CANDIDATES]
    if not pool:
        info["why_not"] = "no measured candidate within the budget to start from"
        return None, info
    if search.scorer.kind == "task":
        scorer = search.scorer
        info["measured_on"] = f"{scorer.label} (--eval-data, held out from --calib)"
    else:
        scorer = proxy_scorer(search.ir, search.ctx, batches=held_out_batches(search),
                              where="calibration batch(es) the distill pass held out of "
                                    "training")
        info["measured_on"] = scorer.label
    info["tried"] = True
    start = time.perf_counter()
    for i, cand in enumerate(pool):
        share = (seconds - (time.perf_counter() - start)) / (len(pool) - i)
        try:
            result, attempt = _attempt(search, cand, scorer, max_drop, share, keep)
        except (UsageError, RuntimeError) as exc:  # the pass cannot train this model
            text = exc.message if isinstance(exc, UsageError) else str(exc).splitlines()[0]
            info["why_not"] = f"the distill pass cannot train this model: {text}"
            break
        info["attempts"].append(attempt)
        if result is not None and result.drop <= max_drop and search._within(result, limits):
            info["seconds"] = round(time.perf_counter() - start, 2)
            return result, info
        if result is not None:
            result.release()
    info["seconds"] = round(time.perf_counter() - start, 2)
    if "why_not" not in info:
        done = [a for a in info["attempts"] if "drop_after" in a]
        info["why_not"] = ("distillation did not bring the closest candidate(s) within "
                           f"--max-drop {max_drop:g}: " + "; ".join(
                               f"drop {a['drop_before']:.4f} -> {a['drop_after']:.4f} after "
                               f"{a['steps']} steps" for a in done)
                           if done else "; ".join(a.get("skipped", "") for a in
                                                  info["attempts"]))
    return None, info


def _attempt(search: Search, cand: Candidate, scorer: Scorer, max_drop: float,
             seconds: float, keep: bool) -> tuple[Candidate | None, dict[str, Any]]:
    t0 = time.perf_counter()
    base = search.base(cand.prune_ratio)
    pruned = bool(cand.prune_ratio)
    rest = [(n, o) for n, o in cand.items if n != "prune"]
    attempt: dict[str, Any] = {"from": pipeline_text(cand.items)}
    # the drop before, on the same held-out data the result is judged on
    if scorer is search.scorer:
        before = cand.drop
    else:
        ir, _, _, _ = search._build_items(base, rest)
        before = scorer.drop(scorer.score(ir))
        del ir
    build_s = time.perf_counter() - t0
    attempt["drop_before"] = before
    # probe: the real pass for a few steps on a clone, to time one step
    probe_items, at = with_distill(rest, {"steps": DISTILL_PROBE_STEPS, "lr": DISTILL_LR},
                                   pruned)
    t1 = time.perf_counter()
    ir, _, _, _ = search._build_items(base, probe_items[:at + 1])
    probe = ir.annotations["distill"]
    del ir
    probe_s = time.perf_counter() - t1
    step_s = max(probe["step_seconds"], 1e-6)
    overhead = max(probe["seconds"] - DISTILL_PROBE_STEPS * step_s, 0.0)
    left = seconds - (time.perf_counter() - t0) - build_s - overhead
    train = len(search.ctx.calibration_batches) - len(held_out_batches(search))
    steps = min(DISTILL_MAX_STEPS, DISTILL_MAX_EPOCHS * train, int(left / step_s))
    attempt.update(step_seconds=round(step_s, 5), probe_seconds=round(probe_s, 2))
    if steps < DISTILL_MIN_STEPS:
        attempt["skipped"] = (f"a step takes {step_s:.3g} s, so {seconds:.0f} s of "
                              f"--distill-budget allow {max(steps, 0)} steps, fewer than "
                              f"{DISTILL_MIN_STEPS}")
        return None, attempt
    items, at = with_distill(rest, {"steps": steps, "lr": DISTILL_LR}, pruned)
    ir, records, ctx, relative = search._build_items(base, items)
    value = scorer.score(ir)
    summary = ir.annotations["distill"]
    full = ([("prune", {"ratio": base.ratio})] if base.ratio else []) + items
    result = Candidate(base.ratio, full, relative, value, scorer.drop(value), dict(cand.choices),
                       cand.predicted_damage, backoffs=cand.backoffs)
    attempt.update(steps=steps, drop_after=result.drop, seconds=round(time.perf_counter() - t0,
                                                                        2),
                   held_out_loss_before=summary["held_out_loss_before"],
                   held_out_loss_after=summary["held_out_loss_after"],
                   kept=summary["kept"], lr=DISTILL_LR, trained=trained_text(summary),
                   trained_params=summary["trained_params"])
    result.distill = {"steps": steps, "lr": DISTILL_LR, "drop_before": before,
                      "drop_after": result.drop, "measured_on": scorer.label,
                      "seconds": attempt["seconds"], "kept": summary["kept"],
                      "trained": trained_text(summary),
                      "trained_params": summary["trained_params"],
                      "where": "before quantize" if items[at + 1:] and any(
                          n == "quantize" for n, _ in items[at + 1:]) else "after quantize"}
    if keep:
        result.ir, result.records, result.ctx = ir, base.records + records, ctx
    search.measured.append(result)
    search.log(f"search: {pipeline_text(full)}: size {relative['size']:.3f}, drop "
               f"{before:.4f} -> {result.drop:.4f} after {steps} distillation steps")
    return result, attempt


def trained_text(summary: dict[str, Any]) -> str:
    """What a ``distill`` pass trained, in words (from its summary)."""
    what = {"all": "the float weights", "factors": "the low-rank factors",
            "matrices": "the float matrices", "norms": "the norm weights",
            "factors+norms": "the low-rank factors and norm weights"}.get(
                summary.get("trainable", "all"), "the float weights")
    if summary.get("scales"):
        what += (" and the quantized weights' float grids (scales / minimums; codes and bytes "
                 "unchanged)")
    return what
