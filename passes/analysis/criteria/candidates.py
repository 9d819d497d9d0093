"""Candidate compression settings a layer is scored under, and how each rewrites a weight.

Sensitivity is a *curve* per layer, one point per setting, so a search can trade bits, kept
channels and rank against cost instead of reading a single number. Each rewrite is the plain
baseline version of that compression (round-to-nearest, magnitude pruning, truncated SVD): it
measures how fragile the layer is, not how good a tuned quantizer could be.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Setting:
    """One way to compress a weight: ``quantize`` to ``value`` bits, ``prune`` to keep a
    ``value`` fraction of output channels, or ``low_rank`` to a ``value`` fraction of its rank."""

    kind: str
    value: float

    @property
    def key(self) -> str:
        """Short stable name used in results: ``q4``, ``keep0.5``, ``rank0.25``."""
        if self.kind == "quantize":
            return f"q{int(self.value)}"
        return f"{'keep' if self.kind == 'prune' else 'rank'}{self.value:g}"

    def apply(self, weight: torch.Tensor, channel_axis: int = 0,
              factors: SvdFactors | None = None) -> torch.Tensor:
        """The compressed weight (same shape and dtype, still dense); ``factors``: the SVD of
        ``weight`` if the caller has it (see :func:`svd_factors`)."""
        if self.kind == "quantize":
            return quantize_rtn(weight, int(self.value))
        if self.kind == "prune":
            return prune_channels(weight, self.value, channel_axis)
        return truncate_rank(weight, self.value, factors)


def settings_from(bits: tuple[int, ...], keep_ratios: tuple[float, ...],
                  rank_ratios: tuple[float, ...]) -> list[Setting]:
    return ([Setting("quantize", b) for b in bits] + [Setting("prune", k) for k in keep_ratios]
            + [Setting("low_rank", r) for r in rank_ratios])


def quantize_rtn(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel round-to-nearest onto ``2**(bits-1) - 1`` levels a side."""
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    qmax = 2 ** (bits - 1) - 1
    scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    quantized = (flat / scale).round().clamp(-qmax, qmax) * scale
    return quantized.reshape(weight.shape).to(weight.dtype)


def prune_channels(weight: torch.Tensor, keep: float, axis: int = 0) -> torch.Tensor:
    """Zero the output channels (slices along ``axis``) with the smallest L2 norms."""
    moved = weight.detach().movedim(axis, 0)
    norms = moved.reshape(moved.shape[0], -1).float().norm(dim=1)
    kept = max(1, round(keep * moved.shape[0]))
    mask = torch.zeros_like(norms, dtype=torch.bool)
    mask[norms.topk(kept).indices] = True
    pruned = moved * mask.view(-1, *([1] * (moved.dim() - 1))).to(moved.dtype)
    return pruned.movedim(0, axis).contiguous()


SvdFactors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def svd_factors(weight: torch.Tensor) -> SvdFactors:
    """``U, S, Vh`` of ``weight`` flattened to out x rest: one SVD serves every rank ratio
    (and, cached by the caller, every criterion: the SVD of an embedding table costs more than
    everything else a proxy criterion does)."""
    matrix = weight.detach().float().reshape(weight.shape[0], -1)
    return torch.linalg.svd(matrix, full_matrices=False)


def truncate_rank(weight: torch.Tensor, ratio: float,
                  factors: SvdFactors | None = None) -> torch.Tensor:
    """Best rank-``ratio * min(out, in)`` approximation (weights flattened to out x rest)."""
    u, s, vh = factors if factors is not None else svd_factors(weight)
    rank = max(1, round(ratio * min(u.shape[0], vh.shape[1])))
    approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return approx.reshape(weight.shape).to(weight.dtype)
