"""Fidelity metrics: how close a compressed model or built artifact is to its reference.

Evaluators are plugins (``slimc_register_evaluators``); these built-ins cover what every model
needs. Each takes the reference outputs and the candidate outputs (numpy arrays, same order)
and returns one number; ``higher_is_better`` tells reports which way is good.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from slimc.hookspec import hookimpl

Arrays = Sequence[np.ndarray]


@dataclass(frozen=True)
class Evaluator:
    name: str
    description: str
    fn: Callable[[Arrays, Arrays], float]
    higher_is_better: bool = False
    #: Only meaningful when the outputs are class scores (see :func:`looks_like_logits`).
    needs_logits: bool = False

    def __call__(self, reference: Arrays, candidate: Arrays) -> float:
        return float(self.fn(reference, candidate))


def _pairs(reference: Arrays, candidate: Arrays):
    if len(reference) != len(candidate):
        raise ValueError(f"{len(candidate)} outputs where {len(reference)} were expected")
    for ref, out in zip(reference, candidate, strict=True):
        ref, out = np.asarray(ref), np.asarray(out)
        if ref.shape != out.shape:
            raise ValueError(f"output shape {out.shape} differs from reference {ref.shape}")
        yield ref.astype(np.float64), out.astype(np.float64)


def max_abs_error(reference: Arrays, candidate: Arrays) -> float:
    return max((float(np.max(np.abs(r - c))) if r.size else 0.0
                for r, c in _pairs(reference, candidate)), default=0.0)


def relative_l2(reference: Arrays, candidate: Arrays) -> float:
    return max((float(np.linalg.norm(r - c) / max(np.linalg.norm(r), 1e-12))
                for r, c in _pairs(reference, candidate)), default=0.0)


def min_cosine(reference: Arrays, candidate: Arrays) -> float:
    """Smallest cosine similarity over outputs, each compared as one flat vector."""
    worst = 1.0
    for r, c in _pairs(reference, candidate):
        nr, nc = np.linalg.norm(r), np.linalg.norm(c)
        if nr == 0 and nc == 0:
            continue
        worst = min(worst, float(r.ravel() @ c.ravel() / max(nr * nc, 1e-30)))
    return worst


def top1_agreement(reference: Arrays, candidate: Arrays) -> float:
    """Share of positions whose argmax over the last axis agrees (for logits); first output."""
    for r, c in _pairs(reference, candidate):
        if r.ndim >= 2 and r.shape[-1] > 1:
            return float(np.mean(np.argmax(r, -1) == np.argmax(c, -1)))
    return 1.0


BUILTIN_EVALUATORS = [
    Evaluator("max_abs_error", "largest absolute difference over all outputs", max_abs_error),
    Evaluator("relative_l2", "largest ||ref - out|| / ||ref|| over outputs", relative_l2),
    Evaluator("cosine", "smallest cosine similarity over outputs", min_cosine, True),
    Evaluator("top1_agreement", "argmax agreement over the last axis of the first output "
              "with more than one class (classifiers and LMs only)", top1_agreement, True,
              needs_logits=True),
]


@hookimpl
def slimc_register_evaluators():
    from slimc.task_eval import BUILTIN_TASK_EVALUATORS

    return BUILTIN_EVALUATORS + BUILTIN_TASK_EVALUATORS


def looks_like_logits(output_names: Sequence[str] | None, reference: Arrays) -> bool:
    """Whether the first output is class scores, where an argmax means something.

    Named outputs decide (Hugging Face's ``logits``; ``last_hidden_state``,
    ``pooler_output`` and embeddings are not); unnamed ones count when 2-D ``[batch, classes]``,
    the shape of a classifier head (token states ``[batch, seq, hidden]`` are not).
    """
    if not reference:
        return False
    name = (output_names[0] if output_names else "").lower()
    if "logit" in name or "score" in name:
        return True
    if any(w in name for w in ("hidden", "pool", "embed", "state", "feature")):
        return False
    return np.asarray(reference[0]).ndim == 2


def evaluate_all(evaluators: dict, reference: Arrays, candidate: Arrays,
                 output_names: Sequence[str] | None = None) -> dict[str, float]:
    """Every fidelity :class:`Evaluator` (task evaluators are skipped: they need data)."""
    logits = looks_like_logits(output_names, reference)
    return {name: round(ev(reference, candidate), 9) for name, ev in evaluators.items()
            if isinstance(ev, Evaluator) and (logits or not ev.needs_logits)}
