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


def divergence_from(kind: str, reference: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """:func:`divergence` against one fixed ``reference``, as a function of the output: the
    reference's float64 log-probabilities (logits) or copy are computed once. The same ops on
    the same values, so the same numbers as :func:`divergence`. Why: a damage table compares
    hundreds of outputs with each reference, and SmolLM2's 64 x 49152 logits made the
    reference's float64 ``log_softmax`` and ``exp`` a third of every comparison (issue 18)."""
    ref = reference.detach().double()
    if kind == "logits":
        log_p = torch.log_softmax(ref, dim=-1)
        p = log_p.exp()

        def kl(output: torch.Tensor) -> float:
            log_q = torch.log_softmax(output.detach().double(), dim=-1)
            return float((p * (log_p - log_q)).sum(-1).mean())
        return kl
    return lambda output: divergence(kind, ref, output)
