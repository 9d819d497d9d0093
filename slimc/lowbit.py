"""Group-wise int3 / int2 weights: the grid, the bit packing and the reference maths.

Why these formats: below int4 (4.3 bits per weight with its scales), slimc had only low rank
to reach small budgets, and low-rank factors of an embedding table lose rare words. Measured
against per-row k-means codebooks on the real layers of all-MiniLM-L6-v2 and SmolLM2-135M
(``benchmarks/lowbit_formats.py``, docs/benchmarks.md) the group-wise grids gave the lower
output error at equal bits, and they reuse the factored int4 kernel's structure.

Layout of a weight ``W[N, K]`` in ``intB-gG`` (``B`` = 3 or 2, ``G`` a multiple of 8):

* each row is padded to ``K' = ceil(K / G) * G`` inputs (padding codes are 0; the kernels pad
  the input with zeros, so they never count);
* ``packed uint8[N, K' * B / 8]``: the row's codes as a little-endian bit stream, code ``k``
  in bits ``[k*B, k*B + B)``; every group starts on a byte boundary, and 8 consecutive codes
  fill exactly ``B`` bytes;
* ``scale fp16[N, K'/G]`` and ``minimum fp16[N, K'/G]``: code ``c`` of group ``g`` stands for
  ``c * scale[n, g] + minimum[n, g]`` (asymmetric, the grid's origin is a float: GGUF's
  Q4_1/Q2_K style), both half precision so the overhead is 32 bits per group.

The grid of each group is chosen to minimise its squared rounding error: a search over
shrinking the ``[min, max]`` range from either side, then two least-squares refits of scale
and minimum to the codes (what llama.cpp's k-quants do); GPTQ (``method=gptq``) uses the same
grid per group and rounds the columns with error feedback.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch
from torch import Tensor

LOWBIT_KINDS = ("int3", "int2")

#: Shrink factors tried for each side of a group's ``[min, max]`` range.
_SHRINK = (1.0, 0.9, 0.8, 0.7, 0.6)


def bits_of(kind: str) -> int:
    return int(kind.removeprefix("int"))


def padded_k(k: int, group: int) -> int:
    return -(-k // group) * group


def row_bytes(k: int, bits: int, group: int) -> int:
    return padded_k(k, group) * bits // 8


def lowbit_row_bits(k: int, bits: int, group: int) -> float:
    """Stored bits of one row of ``k`` weights: codes (padded to whole groups) plus an fp16
    scale and an fp16 minimum per group."""
    return float(padded_k(k, group) * bits + (padded_k(k, group) // group) * 32)


def _grouped(weight: Tensor, group: int) -> Tensor:
    """``[N, K] -> [N, G, group]``; a partial last group is padded with its last value."""
    n, k = weight.shape
    kp = padded_k(k, group)
    if kp != k:
        weight = torch.cat([weight, weight[:, -1:].expand(n, kp - k)], dim=1)
    return weight.reshape(n, kp // group, group)


def _half(t: Tensor) -> Tensor:
    """Rounded to what fp16 storage keeps (clamped to its range)."""
    return t.clamp(-65504.0, 65504.0).half().float()


def _codes(grouped: Tensor, scale: Tensor, minimum: Tensor, top: int) -> Tensor:
    return torch.clamp(torch.round((grouped - minimum[..., None]) / scale[..., None]), 0, top)


#: Grids already searched, by weight content (see :func:`grid`): bounded by entries and bytes,
#: least recently used first out; a lock because packing runs one layer per core.
_GRIDS: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()
_GRIDS_KEPT = 1024
_GRIDS_MAX_BYTES = 256 << 20
_GRIDS_LOCK = threading.Lock()


def content_key(weight: Tensor) -> tuple:
    """A key for ``weight``'s values (shape, dtype and a SHA-256 digest of its bytes): equal
    for equal tensors wherever they live, unlike ``id()`` or ``data_ptr()``. SHA-256 rather
    than BLAKE2: with the CPU's SHA instructions (x86 SHA-NI, ARMv8 crypto) it hashed 2.6x
    faster (9 vs 24 ms for an 11.5 MB weight), and the 320M decoder's -O2 search hashes every
    weight several times (3% of it with BLAKE2, issue 18)."""
    data = weight.detach().cpu().contiguous()
    raw = data.view(torch.uint8) if data.dtype != torch.uint8 else data
    digest = hashlib.sha256(raw.reshape(-1).numpy()).hexdigest()
    return (tuple(data.shape), str(data.dtype), digest)


def grid(weight: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor]:
    """fp16 ``(scale, minimum)`` per (row, group) with the smallest squared rounding error
    (see the module docstring); returned as float32 tensors holding fp16 values.

    The search is ~27 passes over the weight; the budget search asks for the same weight's
    grid once in its damage table and again in every candidate it builds, so results are
    kept by weight content (:func:`content_key`)."""
    key = (*content_key(weight), bits, group)
    with _GRIDS_LOCK:
        hit = _GRIDS.get(key)
        if hit is not None:
            _GRIDS.move_to_end(key)
    if hit is not None:
        return hit[0].clone(), hit[1].clone()
    scale, minimum = _search_grid(weight, bits, group)
    with _GRIDS_LOCK:
        _GRIDS[key] = (scale.clone(), minimum.clone())
        while len(_GRIDS) > 1 and (len(_GRIDS) > _GRIDS_KEPT or _grids_bytes() > _GRIDS_MAX_BYTES):
            _GRIDS.popitem(last=False)
    return scale, minimum


def _grids_bytes() -> int:
    return sum(s.nbytes + m.nbytes for s, m in _GRIDS.values())


#: Rows searched at once by :func:`_search_grid` (each row's groups are independent): its
#: full-size temporaries (the grouped copy, the rounding buffer) were ~0.5 GB for SmolLM2's
#: 49152 x 576 table (issue 18).
GRID_ROWS = 8192
#: ... and at most about this many weights at once: the ~27 candidate grids each make
#: ~9 passes over the block, which then stays in the caches (2 MB of float32) instead of
#: streaming from memory: 1.5-1.9x faster on a 2816 x 1024 weight in isolation (blocks of
#: 128K-1M weights measured; 512K was the fastest), the same grids bit for bit (issue 18:
#: the grid searches were ~15% of the 320M decoder's -O2 search).
GRID_ELEMENTS = 1 << 19


def _search_grid(weight: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor]:
    rows = max(1, min(GRID_ROWS, GRID_ELEMENTS // max(int(weight.shape[-1]), 1)))
    if weight.shape[0] > rows:
        parts = [_search_rows(weight[i:i + rows], bits, group)
                 for i in range(0, weight.shape[0], rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return _search_rows(weight, bits, group)


def _search_rows(weight: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor]:
    """The grid of a block of rows: on the fused kernels of :mod:`slimc.lowbit_fused` where
    they can run (the same grids, ~4x faster), else in torch."""
    from slimc.lowbit_fused import search_rows

    found = search_rows(weight, bits, group)
    return found if found is not None else _search_rows_torch(weight, bits, group)


def _search_rows_torch(weight: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor]:
    top = (1 << bits) - 1
    grouped = _grouped(weight.float(), group)
    lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    center = (lo + hi) / 2
    best_err = torch.full(lo.shape, float("inf"))
    best_s, best_m = torch.ones_like(lo), lo.clone()
    candidates = []
    for a in _SHRINK:
        for b in _SHRINK:
            low = center - (center - lo) * a
            high = center + (hi - center) * b
            candidates.append((low, ((high - low) / top).clamp_min(1e-8)))

    def consider(minimum: Tensor, scale: Tensor) -> None:
        nonlocal best_err, best_s, best_m
        scale, minimum = _half(scale.clamp_min(6e-8)), _half(minimum)
        # _codes(...) * scale + minimum - grouped, squared, in place (one buffer, not ten:
        # the grid search is ~27 of these over the whole weight)
        s, m = scale[..., None], minimum[..., None]
        deq = (grouped - m).div_(s).round_().clamp_(0, top).mul_(s).add_(m).sub_(grouped)
        err = deq.square_().sum(dim=2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, scale, best_s)
        best_m = torch.where(better, minimum, best_m)

    for index, (minimum, scale) in enumerate(candidates):
        consider(minimum, scale)
        if index == 0 and not bool(best_err.any()):
            # The plain [min, max] grid is exact for every group (weights dequantized from a
            # GGUF Q4_1 file at its own group size): nothing can beat zero error (``better``
            # needs a strictly smaller one), so the other 26 passes would change nothing.
            return best_s, best_m
    for _ in range(2):  # least-squares refit of (scale, minimum) to the chosen codes
        q = _codes(grouped, best_s, best_m, top)
        count = float(group)
        sq, sw = q.sum(2), grouped.sum(2)
        sqq, sqw = (q * q).sum(2), (q * grouped).sum(2)
        det = count * sqq - sq * sq
        ok = det > 0
        scale = torch.where(ok, (count * sqw - sq * sw) / det.clamp_min(1e-12), best_s)
        minimum = torch.where(ok, (sw - scale * sq) / count, best_m)
        consider(minimum, torch.where(scale > 0, scale, best_s))
    return best_s, best_m


def codes_on_grid(weight: Tensor, scale: Tensor, minimum: Tensor, bits: int,
                  group: int) -> Tensor:
    """Round-to-nearest codes ``uint8[N, K']`` (padded to whole groups) on the grid."""
    grouped = _grouped(weight.float(), group)
    q = _codes(grouped, scale, minimum, (1 << bits) - 1).reshape(weight.shape[0], -1)
    q[:, weight.shape[1]:] = 0
    return q.to(torch.uint8)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Codes ``uint8[N, K']`` (``K'`` a multiple of 8) -> ``uint8[N, K' * bits / 8]``."""
    n, k = codes.shape
    chunks = codes.reshape(n, k // 8, 8).to(torch.int64)
    word = torch.zeros(n, k // 8, dtype=torch.int64)
    for i in range(8):
        word |= chunks[..., i] << (bits * i)
    out = torch.stack([(word >> (8 * q)) & 0xFF for q in range(bits)], dim=-1)
    return out.reshape(n, k // 8 * bits).to(torch.uint8).contiguous()


def unpack_bits(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``uint8[N, K' * bits / 8]`` -> codes ``uint8[N, K']``."""
    n, width = packed.shape
    chunks = packed.reshape(n, width // bits, bits).to(torch.int64)
    word = torch.zeros(n, width // bits, dtype=torch.int64)
    for q in range(bits):
        word |= chunks[..., q] << (8 * q)
    mask = (1 << bits) - 1
    codes = torch.stack([(word >> (bits * i)) & mask for i in range(8)], dim=-1)
    return codes.reshape(n, -1).to(torch.uint8)


def dequantize_lowbit(packed: Tensor, scale: Tensor, minimum: Tensor, bits: int, group: int,
                      k: int) -> Tensor:
    """Float weight ``[N, k]`` from the stored tensors."""
    codes = unpack_bits(packed, bits)[:, :k].float()
    index = torch.arange(k) // group
    return codes * scale.float()[:, index] + minimum.float()[:, index]


def pack_lowbit(weight: Tensor, bits: int, group: int, scale: Tensor | None = None,
                minimum: Tensor | None = None, codes: Tensor | None = None) -> dict[str, Tensor]:
    """The tensors the IR and the artifact store (``weight``, ``scale``, ``minimum``); a caller
    that chose grid and codes itself (GPTQ) passes them."""
    if scale is None or minimum is None:
        scale, minimum = grid(weight, bits, group)
    if codes is None:
        codes = codes_on_grid(weight, scale, minimum, bits, group)
    return {"weight": pack_bits(codes, bits), "scale": scale.half(), "minimum": minimum.half()}


def lowbit_fake_quantize(weight: Tensor, bits: int, group: int) -> Tensor:
    """What ``weight`` becomes after a round trip through ``intB-gG`` (round-to-nearest)."""
    t = pack_lowbit(weight, bits, group)
    return dequantize_lowbit(t["weight"], t["scale"], t["minimum"], bits, group,
                             weight.shape[1]).to(weight.dtype)
