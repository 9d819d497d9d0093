"""The math of low-rank factorization: ``W[N, K] ≈ U[N, r] · V[r, K]``.

Three ways to choose the rank-r subspace, each minimizing a different error:

* ``svd`` — plain truncated SVD: the best rank-r approximation of ``W`` itself (Frobenius).
  Ignores the data: directions of ``W`` that inputs never excite cost as much as used ones.
* ``whiten`` — SVD-LLM (Wang et al., 2024): minimize the *output* error ``‖(W − W')Xᵀ‖`` on
  calibration activations. With the Cholesky factor ``S`` of ``XᵀX`` (``XᵀX = S Sᵀ``), the SVD
  of ``W S`` truncated to r gives ``W' = U_r Σ_r V_rᵀ S⁻¹``, and the output loss is exactly
  ``Σ_{i>r} σ_i²`` ("truncation-aware": every dropped singular value costs what it says).
* ``asvd`` — ASVD (Yuan et al., 2023): scale input channel j by ``mean|x_j|^α`` before the SVD
  (``W' = SVD_r(W D) D⁻¹``), so channels carrying large activations are kept more faithfully.

The singular values (in the space the method truncates in) are returned too: they give the
rank for an energy threshold and the predicted loss of every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import wraps

import torch
from torch import Tensor

from slimc.jobs import single_threaded


def serial_lapack():
    """Run dense decompositions on one thread. The matrices here (at most a few thousand on a
    side) gain little from LAPACK's threads, and with the cores oversubscribed (a loaded build
    host) a 768x256 SVD took 7.7 s on two threads against 0.4 s on one."""
    return single_threaded()


def _serial(fn):
    @wraps(fn)
    def wrapper(*args, **kwargs):
        with serial_lapack():
            return fn(*args, **kwargs)
    return wrapper


@dataclass
class Spectrum:
    """An SVD of ``W`` in some input metric: ``W = U diag(s) Vh · T⁻¹`` (``T`` = identity for
    plain SVD, the whitening/scaling transform otherwise)."""

    u: Tensor  # [N, q]
    s: Tensor  # [q], descending
    vh: Tensor  # [q, K] (already multiplied by T⁻¹)

    def energy_rank(self, energy: float) -> int:
        """Smallest r whose kept ``Σ σ_i²`` is at least ``energy`` of the total."""
        sq = self.s.double().square()
        total = float(sq.sum())
        if total <= 0:
            return 1
        kept = torch.cumsum(sq, 0) / total
        return int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype)).item()) + 1

    def loss(self, rank: int) -> float:
        """Relative squared error left by truncating to ``rank`` (in this metric)."""
        sq = self.s.double().square()
        total = float(sq.sum())
        return float(sq[rank:].sum()) / total if total > 0 else 0.0

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """``(U[N, r], V[r, K])`` float32, the singular values split evenly (``√σ`` each side)
        so both factors have comparable ranges (what int8/int4 quantization wants)."""
        root = self.s[:rank].sqrt()
        u = self.u[:, :rank] * root[None, :]
        v = root[:, None] * self.vh[:rank]
        return u.float().contiguous(), v.float().contiguous()


@_serial
def plain(weight: Tensor) -> Spectrum:
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return Spectrum(u, s, vh)


@_serial
def cholesky_factor(gram: Tensor) -> Tensor:
    """Lower-triangular ``S`` with ``S Sᵀ = XᵀX + λI``; λ grows from 1e-6 of the mean diagonal
    until the factorization succeeds (dead input channels make ``XᵀX`` singular)."""
    gram = gram.double()
    gram = (gram + gram.T) / 2
    scale = float(gram.diagonal().mean()) or 1.0
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    damp = 1e-6
    while True:
        s, info = torch.linalg.cholesky_ex(gram + damp * scale * eye)
        if int(info) == 0:
            return s
        damp *= 10
        if damp > 1.0:
            raise ValueError("XᵀX is not positive definite even with strong damping")


@_serial
def whitened(weight: Tensor, gram: Tensor) -> Spectrum:
    """SVD-LLM: the SVD of ``W S`` with ``S`` the Cholesky factor of ``XᵀX``."""
    s_chol = cholesky_factor(gram)
    u, s, vh = torch.linalg.svd(weight.double() @ s_chol, full_matrices=False)
    # vh · S⁻¹ without forming the inverse: solve Y S = vh, i.e. Sᵀ Yᵀ = vhᵀ.
    vh = torch.linalg.solve_triangular(s_chol.T, vh.T, upper=True).T
    return Spectrum(u, s, vh)


@_serial
def activation_scaled(weight: Tensor, mean_abs: Tensor, alpha: float = 0.5) -> Spectrum:
    """ASVD: the SVD of ``W D`` with ``D = diag(mean|x|^α)`` (normalized to mean 1)."""
    d = mean_abs.double().clamp_min(1e-8).pow(alpha)
    d = d / d.mean()
    u, s, vh = torch.linalg.svd(weight.double() * d[None, :], full_matrices=False)
    return Spectrum(u, s, vh / d[None, :])


def max_useful_rank(n: int, k: int) -> float:
    """Ranks below ``N·K/(N+K)`` store (and multiply) fewer numbers than ``W`` itself."""
    return n * k / (n + k)


def rank_for_ratio(n: int, k: int, keep: float, round_to: int) -> int:
    """The rank storing ``keep`` of ``W``'s N·K parameters, rounded down to ``round_to``."""
    r = int(keep * n * k / (n + k))
    return (r // round_to) * round_to


def round_rank(rank: int, round_to: int, limit: int) -> int:
    """``rank`` rounded up to a multiple of ``round_to`` (the target's vector width), at most
    ``limit``."""
    return min(limit, -(-rank // round_to) * round_to)


def closest_plan(plan, goal: float, lo: float, hi: float, *, removed_grows: bool,
                 steps: int = 40):
    """Bisect a budget knob ``x`` in ``[lo, hi]`` for the plan removing closest to ``goal``.

    ``plan(x)`` returns ``(plan, removed_params)``; ``removed_grows`` says whether removal
    grows with ``x`` (an energy threshold) or falls (a kept fraction). Ranks are rounded to
    vector widths, so removal is a step function and no ``x`` may hit ``goal`` exactly: the
    closest plan seen wins. Returns ``(best_plan, best_removed, lo, hi)`` with the final bracket.
    """
    best = plan(hi if removed_grows else lo)
    for _ in range(steps):
        mid = (lo + hi) / 2
        candidate = plan(mid)
        if abs(candidate[1] - goal) < abs(best[1] - goal):
            best = candidate
        if (candidate[1] > goal) == removed_grows:
            hi = mid
        else:
            lo = mid
    return best[0], best[1], lo, hi
