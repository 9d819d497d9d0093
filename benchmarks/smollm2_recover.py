"""Recovery by distillation of the byte-free parameters of a quantized SmolLM2 (issue 17).

After a row of ``smollm2_levers.py`` has replaced each weight by its round trip through a
grouped format (``W_q = code * s + z`` per group of ``g`` inputs), the codes are fixed but the
fp16 group scales ``s`` and minimums ``z`` and the RMSNorm weights cost no extra bytes and can
still move. Tuning ``s' = s (1 + a)`` and ``z' = z (1 + a) + b s`` is the per-group affine map
``W' = W_q (1 + a) + b s`` of the dequantized weights, so it needs only ``W_q``: ``a`` (a
relative scale change) and ``b`` (a shift in grid steps) start at zero and are trained with
Adam on the KL divergence of the student's logits from the fp32 teacher's on calibration
text (never the evaluation text). The step ``s`` is estimated from each group's range of
dequantized values over ``2^bits - 1``; the tuned ``s'``, ``z'`` are kept in fp32 here (the
artifact's fp16 would round them by ~5e-4 relative, far below the rounding error tuned away).
"""

from __future__ import annotations

import math
import time

import torch
from torch.func import functional_call

from passes.quantize.formats import Format
from slimc.lowbit import bits_of


def group_steps(wq: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``[N, G]`` estimated grid step of each group of ``wq [N, K]``."""
    n, k = wq.shape
    g = fmt.group_size
    groups = -(-k // g)
    padded = torch.nn.functional.pad(wq, (0, groups * g - k), value=float("nan"))
    view = padded.reshape(n, groups, g)
    rng = view.nan_to_num(float("-inf")).amax(-1) - view.nan_to_num(float("inf")).amin(-1)
    levels = (1 << bits_of(fmt.kind)) - 1 if fmt.lowbit else 15
    return (rng / levels).clamp_min(1e-8)


class Tuned(torch.nn.Module):
    """The trainable per-group ``a``, ``b`` of each quantized matrix and the norm weights."""

    def __init__(self, quantized: dict[str, tuple[torch.Tensor, Format]],
                 norms: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.names = list(quantized)
        self.fixed = {}
        self.a = torch.nn.ParameterList()
        self.b = torch.nn.ParameterList()
        for name, (wq, fmt) in quantized.items():
            steps = group_steps(wq, fmt)
            index = torch.arange(wq.shape[1]) // fmt.group_size
            self.fixed[name] = (wq, steps, index)
            self.a.append(torch.nn.Parameter(torch.zeros_like(steps)))
            self.b.append(torch.nn.Parameter(torch.zeros_like(steps)))
        self.norm_names = list(norms)
        self.norms = torch.nn.ParameterList(torch.nn.Parameter(v.detach().clone())
                                            for v in norms.values())

    def weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, a, b in zip(self.names, self.a, self.b, strict=True):
            wq, steps, index = self.fixed[name]
            out[name] = wq * (1 + a[:, index]) + (b * steps)[:, index]
        out.update(zip(self.norm_names, self.norms, strict=True))
        return out


def kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of the next-token distributions."""
    s = torch.log_softmax(student.float().flatten(0, -2), -1)
    t = torch.log_softmax(teacher.float().flatten(0, -2), -1)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")


def recover(model, teacher, quantized: dict[str, tuple[torch.Tensor, Format]],
            train: list[dict], held: list[dict], steps: int, lr: float,
            log=print, held_every: int = 0, probe=None) -> dict:
    """Train ``Tuned`` for ``steps`` Adam steps (10% linear warm-up, cosine decay, clip 1)
    on ``train`` batches (teacher = the fp32 ``teacher`` model); ``held`` calibration-text
    batches, never trained on, measure the KL before and after. Returns the tuned weights
    and a summary; the weights are those after training only if the held-out KL fell.
    ``held_every`` > 0 also measures the held-apart KL every that many steps (its curve);
    ``probe`` (given a ``batch -> logits`` function of the current weights, returns a number,
    e.g. the evaluation perplexity) is then called at the same steps (``probe_curve``): how
    much each stretch of steps buys, mid-schedule (the learning rate not yet decayed)."""
    norms = {n: p for n, p in model.named_parameters() if p.dim() == 1}
    tuned = Tuned(quantized, norms)
    tied = {"model.embed_tokens.weight": "lm_head.weight"}

    def run(batch, weights):
        weights = dict(weights)
        for src, dst in tied.items():
            if src in weights:
                weights[dst] = weights[src]
        return functional_call(model, weights, (), {"input_ids": batch["input_ids"],
                                                     "use_cache": False}).logits

    with torch.no_grad():
        targets = {id(b): teacher(input_ids=b["input_ids"], use_cache=False).logits.half()
                   for b in held}

    def held_kl() -> float:
        with torch.no_grad():
            w = tuned.weights()
            return sum(float(kl(run(b, w), targets[id(b)])) for b in held) / len(held)

    before = held_kl()
    log(f"recover: held-apart KL before {before:.4f}")
    opt = torch.optim.Adam(tuned.parameters(), lr=lr)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm
        else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm))))
    t0, curve, held_curve, probe_curve = time.perf_counter(), [], [(0, before)], []
    for step in range(steps):
        batch = train[step % len(train)]
        with torch.no_grad():
            target = teacher(input_ids=batch["input_ids"], use_cache=False).logits
        loss = kl(run(batch, tuned.weights()), target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tuned.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(float(loss.detach()))
        if held_every and (step + 1) % held_every == 0 and step + 1 < steps:
            held_curve.append((step + 1, held_kl()))
            log(f"recover: step {step + 1} held-apart KL {held_curve[-1][1]:.4f}")
            if probe is not None:
                with torch.no_grad():
                    w = tuned.weights()
                    probe_curve.append((step + 1, float(probe(lambda b, w=w: run(b, w)))))
                log(f"recover: step {step + 1} probe {probe_curve[-1][1]:.4f}")
        if (step + 1) % 10 == 0 or step == 0:
            log(f"recover: step {step + 1}/{steps} train KL {curve[-1]:.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    after = held_kl()
    held_curve.append((steps, after))
    log(f"recover: held-apart KL after {after:.4f}")
    with torch.no_grad():
        weights = {k: v.detach() for k, v in tuned.weights().items()} if after < before \
            else None
    return {"weights": weights, "held_kl_before": before, "held_kl_after": after,
            "steps": steps, "lr": lr, "train_curve": curve, "held_curve": held_curve,
            "probe_curve": probe_curve,
            "train_s": round(time.perf_counter() - t0, 1)}
