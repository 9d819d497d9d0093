"""How much a model's output changed: the measure depends on what the output is.

Logits are compared as distributions (KL divergence of the softmax, the loss a language model
actually suffers), embeddings by direction (1 - cosine, what retrieval uses), anything else by
relative L2. Each returns the mean over positions, so batches of any size are comparable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def output_kind(name: str) -> str:
    """``logits``, ``embedding`` or ``other`` from the output's name."""
    lowered = name.lower()
    if "logit" in lowered:
        return "logits"
    if any(word in lowered for word in ("hidden_state", "embed", "pooler", "sentence")):
        return "embedding"
    return "other"


def divergence(kind: str, reference: torch.Tensor, output: torch.Tensor) -> float:
    """Mean change of ``output`` against ``reference`` (0 when identical)."""
    ref, out = reference.detach().double(), output.detach().double()
    if kind == "logits":
        log_p = torch.log_softmax(ref, dim=-1)
        log_q = torch.log_softmax(out, dim=-1)
        return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    if kind == "embedding":
        cos = torch.nn.functional.cosine_similarity(ref, out, dim=-1, eps=1e-12)
        return float((1.0 - cos).mean())
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


#: KL values below this are rounding in :func:`divergence_from`'s float64 sums (~1e-14 on
#: SmolLM2's logits) and read as 0.
KL_RESOLUTION = 1e-12


def divergence_from(kind: str, reference: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """:func:`divergence` against one fixed ``reference``, as a function of the output, with
    the reference's side computed once. Why: a damage table compares hundreds of outputs with
    each reference, and for SmolLM2's 64 x 49152 logits each float64 KL took as long as a
    forward (~120 ms of CPU; issue 18).

    For logits, per position ``KL = sum p log p - sum p o + logsumexp(o) sum p`` (``o`` the
    output's logits, ``log q = o - logsumexp(o)``): the first and last sums are the
    reference's, the middle one a dot product, so an output costs one float64 ``logsumexp``
    and one dot product instead of a ``log_softmax``, an ``exp`` and three full-size
    temporaries (3x less CPU). In float64 it agrees with :func:`divergence` to ~1e-9
    relative at the divergences a damage table sees (1e-7 .. 1: measured 1e-9 .. 1e-15) and
    within ~1e-14 absolute below. Values under :data:`KL_RESOLUTION` (rounding: the sums are
    of order the entropy, ~10) are 0, so the reference itself and an unchanged output give
    exactly 0, never a rounding residue a damage table would take for a measured effect."""
    ref = reference.detach().double()
    if kind == "logits":
        log_p = torch.log_softmax(ref, dim=-1)
        p = log_p.exp()
        entropy = (p * log_p).sum(-1)  # sum p log p, per position
        mass = p.sum(-1)
        rows = p.unsqueeze(-2)

        def kl(output: torch.Tensor) -> float:
            o = output.detach().double()
            dot = (rows @ o.unsqueeze(-1)).squeeze(-1).squeeze(-1)  # sum p o, per position
            value = float((entropy - dot + torch.logsumexp(o, dim=-1) * mass).mean())
            return value if value > KL_RESOLUTION else 0.0
        return kl
    return lambda output: divergence(kind, ref, output)
