"""Orthogonal matrices for rotating a residual stream (QuaRot / SpinQuant style).

A rotation ``Q`` of the hidden dimension leaves an RMSNorm without weight unchanged
(``rms(x Q) = rms(x)``), so folding every norm's weight into the matrices that read it and then
multiplying everything that writes the residual by ``Q`` and everything that reads it by
``Q^T`` changes no output; but the rotated weights have their outlier columns spread over all
inputs, which is what group-wise int3/int4 grids need (one large input no longer sets the step
of a whole group).
"""

from __future__ import annotations

import torch

KINDS = ("hadamard", "random")


def walsh_hadamard(n: int) -> torch.Tensor:
    """The ``n x n`` Sylvester Hadamard matrix (entries +-1), ``n`` a power of two."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random ``n x n`` orthogonal matrix (QR of a Gaussian, signs fixed), float64."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).contiguous()


def randomized_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """``diag(signs) (H_{2^k} kron R_m) / sqrt(2^k)``: ``n = 2^k m`` with ``m`` odd, ``R_m``
    random orthogonal (nothing for ``m = 1``). Every entry has about the same magnitude for
    power-of-two ``n``; for others (SmolLM2's 576 = 64 x 9) the Hadamard factor still spreads
    each input over 64 blocks."""
    k = n & -n
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) * 2 - 1
    h = walsh_hadamard(k) / k ** 0.5
    m = n // k
    core = torch.kron(h.contiguous(), random_orthogonal(m, seed + 1)) if m > 1 else h
    return signs.to(torch.float64).unsqueeze(1) * core


def rotation(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    """The ``n x n`` orthogonal matrix of ``kind`` (one of ``KINDS``), float64."""
    if kind == "hadamard":
        return randomized_hadamard(n, seed)
    if kind == "random":
        return random_orthogonal(n, seed)
    raise ValueError(f"rotation kind must be one of {', '.join(KINDS)}, not {kind!r}")
