"""The low-bit grid search (:func:`slimc.lowbit.grid`) as two fused host kernels, bit for bit
the torch search's grids.

Why: the search tries 27 grids per group (25 shrunk ``[min, max]`` ranges, two least-squares
refits), and in torch each try is ~9 elementwise passes over the weight plus a sum. On the
320M decoder's ``-O2`` search those passes were the largest part of the damage table (78 of
~200 CPU-s on a Rocket Lake host, issue 18; every layer's three ``-fz`` grids, and the
candidates' quantize pass asks for the same ones). Here one kernel computes, for a block of
groups, every candidate's squared rounding error and keeps the first smallest (one pass over
the block per candidate, out of L1, no temporaries), and a second one the refits' code sums.

Bit for bit: each element goes through the same IEEE float32 operations as the torch search
(``(w - m) / s``, round half to even, clamp, ``* s + m - w``, square; the codes' products for
the refits), the kernels are built without FMA (``-fma``: LLVM would otherwise fuse
``q * s + m`` into one rounding), and each group's sum is added in the order of torch's float
sum over a contiguous axis (:func:`torch_sum_order`: per lane of its vector width, four
partial sums, then the lanes in order), so the errors, the comparisons and the grids are the
same numbers. Where that cannot be guaranteed the torch search runs instead: not an x86 host,
a group size not a multiple of torch's lanes, a block with a non-finite weight, a TVM build
that fails, or a kernel that differs from the torch search on the first check of its
(group size, bits) (:func:`kernels`). ``SLIMC_FUSED_GRID=0`` turns the kernels off.
"""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

#: Largest group the kernels are built for (the sum is unrolled per group).
MAX_GROUP = 256
#: Groups per vector in the kernels (one group per lane, so a group's sum is sequential).
VECTOR = 8

_LOCK = threading.Lock()
_BUILT: dict[tuple[int, int], tuple[Callable, Callable] | None] = {}
_LANES: list[int | None] = []


def enabled() -> bool:
    """The kernels may be used: an x86-64 host (the FMA switch is x86's) and not turned off."""
    return os.environ.get("SLIMC_FUSED_GRID", "1") != "0" and \
        platform.machine().lower() in ("x86_64", "amd64")


def torch_sum_order(terms: Sequence, lanes: int):
    """``terms[0] + ... + terms[-1]`` (expressions or numbers) added in the order torch's
    float sum over a contiguous axis of ``len(terms)`` (a multiple of ``lanes``) uses
    (ATen's ``vectorized_inner_sum``: the axis as vectors of ``lanes``, four partial vector
    sums in turn (vector ``i`` into partial ``i % 4`` for whole rounds of four, the rest into
    the first), the four partials added, then the lanes in order). Its leading additions of
    0.0 are left out: they change nothing but the sign of an all-zero sum, which the caller
    restores with ``+ 0.0``."""
    n = len(terms) // lanes
    rounds = n // 4
    total = None
    for lane in range(lanes):
        partial: list = [None] * 4
        for i in range(rounds):
            for k in range(4):
                t = terms[(4 * i + k) * lanes + lane]
                partial[k] = t if partial[k] is None else partial[k] + t
        for i in range(rounds * 4, n):
            t = terms[i * lanes + lane]
            partial[0] = t if partial[0] is None else partial[0] + t
        lane_sum = None
        for p in partial:
            if p is not None:
                lane_sum = p if lane_sum is None else lane_sum + p
        total = lane_sum if total is None else total + lane_sum
    return total


def torch_lanes() -> int | None:
    """The vector width of torch's float sum on this host (8 with its AVX2 kernels, 16 with
    AVX-512 ones), found by replaying :func:`torch_sum_order` in numpy against ``torch.sum``;
    None when neither matches (then the kernels are not used)."""
    with _LOCK:
        if _LANES:
            return _LANES[0]
        rng = np.random.default_rng(0)
        x = (rng.standard_normal((4096, 128)).astype(np.float32) ** 2) * np.float32(1e-3)
        found = None
        for lanes in (8, 16, 4):
            if all(_replay(x[:, :width], lanes) for width in (32, 64, 128)):
                found = lanes
                break
        _LANES.append(found)
        return found


def _replay(x: np.ndarray, lanes: int) -> bool:
    cols = [x[:, j] for j in range(x.shape[1])]
    with np.errstate(all="ignore"):
        ours = torch_sum_order(cols, lanes)
    return bool(np.array_equal(ours.astype(np.float32), torch.from_numpy(x).sum(dim=1).numpy()))


def _target() -> dict:
    import tvm

    return {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "mattr": ["-fma"]}


def _build_search(group: int, top: int, lanes: int) -> Callable:
    """``search(x[G, B], m[C, B], s[C, B], index[B], error[B])``: for each group ``b`` (a
    column of ``x``) the first candidate ``c`` with the smallest squared rounding error on the
    grid ``(s[c, b], m[c, b])``, and that error."""
    import tvm
    from tvm import s_tir, te, tirx

    b, c = te.var("b", "int64"), te.var("c", "int64")
    x = te.placeholder((group, b), "float32", name="x")
    m = te.placeholder((c, b), "float32", name="m")
    s = te.placeholder((c, b), "float32", name="s")
    zero, high = tirx.const(0.0, "float32"), tirx.const(float(top), "float32")

    def error(ci, bi):
        mi, si = m[ci, bi], s[ci, bi]
        terms = []
        for j in range(group):
            w = x[j, bi]
            q = tirx.min(tirx.max(tirx.nearbyint((w - mi) / si), zero), high)
            d = q * si + mi - w
            terms.append(d * d)
        return torch_sum_order(terms, lanes)

    def combine(acc, new):  # a strictly smaller error wins: the first of equal ones stays
        take = new[1] < acc[1]
        return tirx.Select(take, new[0], acc[0]), tirx.Select(take, new[1], acc[1])

    first_min = te.comm_reducer(
        combine, lambda t0, t1: (tirx.const(-1, t0), tirx.const(float("inf"), t1)),
        name="first_min")
    k = te.reduce_axis((0, c), name="k")
    index, err = te.compute((b,), lambda bi: first_min((k.astype("int32"), error(k, bi)),
                                                       axis=k), name="best")
    sch = s_tir.Schedule(te.create_prim_func([x, m, s, index, err]))
    bi, ki = sch.get_loops(sch.get_sblock("best"))
    outer, inner = sch.split(bi, [None, VECTOR])
    sch.reorder(outer, ki, inner)
    sch.vectorize(inner)
    return tvm.compile(sch.mod, target=_target())["main"]


def _build_refit(group: int, top: int, lanes: int) -> Callable:
    """``refit(x[G, B], m[B], s[B], sum_q[B], sum_qq[B], sum_qw[B], sum_w[B])``: the sums of
    the least-squares refit over each group's codes on its grid (the codes as
    :func:`slimc.lowbit._codes` rounds them) and weights."""
    import tvm
    from tvm import s_tir, te, tirx

    b = te.var("b", "int64")
    x = te.placeholder((group, b), "float32", name="x")
    m = te.placeholder((b,), "float32", name="m")
    s = te.placeholder((b,), "float32", name="s")
    zero, high = tirx.const(0.0, "float32"), tirx.const(float(top), "float32")

    def sums(bi):
        q = [tirx.min(tirx.max(tirx.nearbyint((x[j, bi] - m[bi]) / s[bi]), zero), high)
             for j in range(group)]
        return [torch_sum_order(q, lanes), torch_sum_order([v * v for v in q], lanes),
                torch_sum_order([v * x[j, bi] for j, v in enumerate(q)], lanes),
                torch_sum_order([x[j, bi] for j in range(group)], lanes)]

    outs = te.compute((b,), sums, name="sums")
    sch = s_tir.Schedule(te.create_prim_func([x, m, s, *outs]))
    (bi,) = sch.get_loops(sch.get_sblock("sums_v0"))  # the four share the loop
    _, inner = sch.split(bi, [None, VECTOR])
    sch.vectorize(inner)
    return tvm.compile(sch.mod, target=_target())["main"]


def kernels(group: int, bits: int) -> tuple[Callable, Callable] | None:
    """The (search, refit) kernels for ``intB-gG`` grids, built once per process and checked
    against the torch search on a test weight; None where they cannot be used (see the
    module docstring)."""
    key = (group, bits)
    if key in _BUILT:
        return _BUILT[key]
    lanes = torch_lanes() if enabled() else None
    with _LOCK:
        if key in _BUILT:
            return _BUILT[key]
        built = None
        if lanes is not None and group % lanes == 0 and group <= MAX_GROUP:
            try:
                top = (1 << bits) - 1
                built = (_build_search(group, top, lanes), _build_refit(group, top, lanes))
                for f in built:
                    f.release_gil = True  # the damage table runs one layer per core
            except Exception:  # noqa: BLE001 - no kernel: the torch search, same grids
                built = None
            if built is not None and not _agrees(group, bits, built):
                built = None
        _BUILT[key] = built
        return built


def _agrees(group: int, bits: int, built: tuple[Callable, Callable]) -> bool:
    """The fused search gives the torch search's grid on a test weight (random groups,
    outliers, constant groups, groups already on a grid)."""
    from slimc.lowbit import _search_rows_torch

    g = torch.Generator().manual_seed(group * 8 + bits)
    w = torch.randn(48, 4 * group, generator=g) * 0.05
    w[::7, 3] *= 20  # outliers
    w[5, :group] = 0.25  # a constant group
    codes = torch.randint(0, 1 << bits, (8, 4 * group), generator=g).float()
    w[40:] = codes * 0.0078125 - 0.0625  # groups exactly on a grid
    fused = search_rows(w, bits, group, built)
    if fused is None:
        return False
    plain = _search_rows_torch(w, bits, group)
    return all(torch.equal(a, b) for a, b in zip(fused, plain, strict=True))


def _ffi(t: Tensor):
    import tvm

    if t.data_ptr() % 64:  # TVM's buffers are 64-byte aligned
        t = t.clone()
    return tvm.runtime.from_dlpack(t)


def search_rows(weight: Tensor, bits: int, group: int,
                built: tuple[Callable, Callable] | None = None) -> tuple[Tensor, Tensor] | None:
    """:func:`slimc.lowbit._search_rows_torch` on the kernels (``built``, default
    :func:`kernels`): the same ``(scale, minimum)``; None where they cannot be used (the
    caller runs the torch search)."""
    from slimc.lowbit import _SHRINK, _grouped, _half

    built = built or kernels(group, bits)
    if built is None:
        return None
    search, refit = built
    top = (1 << bits) - 1
    grouped = _grouped(weight.float(), group)
    lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
        return None  # (amin / amax carry a NaN through)
    shape, count = lo.shape, lo.numel()
    columns = _ffi(grouped.reshape(count, group).t().contiguous())
    center = (lo + hi) / 2
    # the 25 shrunk ranges (minimum shrink a, maximum shrink b: candidate 5 a + b), with the
    # torch search's operations, as [25, groups]
    shrink = torch.tensor(_SHRINK, dtype=torch.float32)[:, None, None]
    lows = center - (center - lo) * shrink
    highs = center + (hi - center) * shrink
    scales = _half(((highs[None] - lows[:, None]) / top).clamp_min(1e-8).clamp_min(6e-8))
    minimums = _half(lows)[:, None].expand(scales.shape)
    scales, minimums = scales.reshape(-1, count), minimums.reshape(-1, count)
    best_err = torch.full(shape, float("inf"))
    best_s, best_m = torch.ones_like(lo), lo.clone()

    def consider(m: Tensor, s: Tensor) -> None:
        nonlocal best_err, best_s, best_m
        index = torch.empty(count, dtype=torch.int32)
        err = torch.empty(count)
        search(columns, _ffi(m), _ffi(s), _ffi(index), _ffi(err))
        err = (err + 0.0).view(shape)
        better = err < best_err
        pick = index.long().clamp_min(0)[None]
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s.gather(0, pick)[0].view(shape), best_s)
        best_m = torch.where(better, m.gather(0, pick)[0].view(shape), best_m)

    consider(minimums[:1], scales[:1])
    if not bool(best_err.any()):  # the plain grid is exact: nothing can beat it
        return best_s, best_m
    consider(minimums[1:], scales[1:])
    for _ in range(2):  # the least-squares refits, as the torch search
        sums = [torch.empty(count) for _ in range(4)]
        refit(columns, _ffi(best_m.reshape(count)), _ffi(best_s.reshape(count)),
              *(_ffi(t) for t in sums))
        sq, sqq, sqw, total = ((t + 0.0).view(shape) for t in sums)
        n = float(group)
        det = n * sqq - sq * sq
        ok = det > 0
        scale = torch.where(ok, (n * sqw - sq * total) / det.clamp_min(1e-12), best_s)
        minimum = torch.where(ok, (total - scale * sq) / n, best_m)
        scale = torch.where(scale > 0, scale, best_s)
        consider(_half(minimum).reshape(1, count), _half(scale.clamp_min(6e-8)).reshape(1, count))
    return best_s, best_m
