"""Convolutions: Tucker-2 factorization ``W[O, I, *k] ≈ core ×₀ A ×₁ B`` as three real convs.

A convolution's weight has two channel modes (output O, input I) and small spatial modes.
Tucker-2 (Kim et al., ICLR 2016, "Compression of deep convolutional neural networks for fast
and low power mobile applications") compresses the two channel modes only:

    conv(x, W)  ≈  conv₁ₓ₁(conv_k(conv₁ₓ₁(x, Bᵀ), core), A)

* ``Bᵀ[r_in, I, 1…]`` — a pointwise conv projecting the input channels onto r_in,
* ``core[r_out, r_in, *k]`` — the original spatial conv (stride, padding, dilation kept)
  between the two small channel spaces,
* ``A[O, r_out, 1…]`` — a pointwise conv back to O channels (it carries the bias).

The factors come from HOSVD (leading singular vectors of the mode-0 and mode-1 unfoldings)
refined by a few HOOI sweeps. A pointwise (1x1) conv is a matrix, so it gets the plain
two-factor SVD instead (two 1x1 convs). Grouped and depthwise convs are left alone: their
channel modes are already block-diagonal, so there is no dense channel mode to compress.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from slimc.passes.lowrank import factorize
from torch import Tensor
from torch.fx import Node

from slimc.ir import IR
from slimc.layers import Layer, conv_geometry

aten = torch.ops.aten

#: Placeholder names of the factors :func:`factorize_conv` creates.
FACTOR_NAME = re.compile(r"_tk_(in|out|core)(_\d+)?$")


@dataclass
class Tucker2:
    """``W ≈ core ×₀ a ×₁ b`` (``a[O, r_out]``, ``b[I, r_in]`` orthonormal columns)."""

    a: Tensor
    core: Tensor
    b: Tensor

    def reconstruct(self) -> Tensor:
        # one mode at a time: a three-operand einsum contracts left to right without
        # opt_einsum, i.e. through the O x r_out x I x r_in outer product of the two factors
        # (tens of GB for a ResNet's 512-channel convs)
        return _expand(_expand(self.core, self.b, 1), self.a, 0)


def _expand(t: Tensor, factor: Tensor, mode: int) -> Tensor:
    """Mode-``mode`` product ``t ×_mode factor`` (``factor[n, r]`` maps the rank-r mode of
    ``t`` to n), never larger than its input or output."""
    return torch.movedim(torch.tensordot(factor, t, dims=([1], [mode])), 0, mode)


def _project(t: Tensor, factor: Tensor, mode: int) -> Tensor:
    """Mode-``mode`` product with ``factorᵀ`` (``factor[n, r]``: the n-wide mode to r)."""
    return torch.movedim(torch.tensordot(factor, t, dims=([0], [mode])), 0, mode)


def _leading(unfolded: Tensor, rank: int) -> Tensor:
    """The ``rank`` leading left singular vectors of a wide ``[n, m]`` unfolding, from the
    eigenvectors of its ``n x n`` Gram matrix (in float64): a GEMM and a small ``eigh``
    instead of an SVD of the ``n x m`` matrix (8 of them per conv, ~10x faster for a
    512-channel 3x3 conv)."""
    u = unfolded.double()
    _, vectors = torch.linalg.eigh(u @ u.T)
    return vectors[:, -rank:].flip(1) if rank else vectors[:, :0]


@factorize._serial
def mode_spectra(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Singular values of the output-channel and input-channel unfoldings."""
    w = weight.double()
    o, i = w.shape[:2]
    return (_singular_values(w.reshape(o, -1)),
            _singular_values(w.transpose(0, 1).reshape(i, -1)))


def _singular_values(unfolded: Tensor) -> Tensor:
    """Descending singular values of a wide unfolding, from its Gram matrix's eigenvalues."""
    values = torch.linalg.eigvalsh(unfolded @ unfolded.T)
    return values.clamp_min(0).sqrt().flip(0)


@factorize._serial
def tucker2(weight: Tensor, r_out: int, r_in: int, sweeps: int = 3) -> Tucker2:
    """HOSVD initialization, then ``sweeps`` rounds of HOOI (each factor the leading subspace
    of the weight projected on the other), which only lowers the reconstruction error."""
    w = weight.double()
    o, i = w.shape[:2]
    a = _leading(w.reshape(o, -1), r_out)
    b = _leading(w.transpose(0, 1).reshape(i, -1), r_in)
    for _ in range(sweeps):
        a = _leading(_project(w, b, 1).reshape(o, -1), r_out)
        b = _leading(_project(w, a, 0).transpose(0, 1).reshape(i, -1), r_in)
    core = _project(_project(w, a, 0), b, 1)
    return Tucker2(a, core, b)


def params(o: int, i: int, kernel: int, r_out: int, r_in: int) -> int:
    """Weights stored by the factorized conv (pointwise: two factors, no core)."""
    if kernel == 1:
        return r_out * (o + i)
    return r_in * i + r_out * r_in * kernel + o * r_out


def ranks_for_keep(o: int, i: int, kernel: int, keep: float, round_to: int) -> tuple[int, int]:
    """Channel ranks in proportion to O and I (the same fraction of each mode) storing at most
    ``keep`` of the dense ``O·I·k`` weights, rounded down to ``round_to`` (0 when none fits)."""
    budget = keep * o * i * kernel
    if kernel == 1:
        r = int(budget / (o + i)) // round_to * round_to
        return r, r
    lo, hi = 0.0, 1.0  # fraction of each channel mode kept
    for _ in range(40):
        mid = (lo + hi) / 2
        r_out = max(1, int(mid * o) // round_to * round_to)
        r_in = max(1, int(mid * i) // round_to * round_to)
        if params(o, i, kernel, r_out, r_in) <= budget:
            lo = mid
        else:
            hi = mid
    r_out = min(o, int(lo * o) // round_to * round_to)
    r_in = min(i, int(lo * i) // round_to * round_to)
    if r_out <= 0 or r_in <= 0 or params(o, i, kernel, r_out, r_in) > budget:
        return 0, 0
    return r_out, r_in


def energy_ranks(weight: Tensor, energy: float, round_to: int) -> tuple[int, int]:
    """Per channel mode, the smallest rank keeping ``energy`` of ``Σσ²``, rounded up."""
    out = []
    for s in mode_spectra(weight):
        sq = s.square()
        kept = torch.cumsum(sq, 0) / sq.sum().clamp_min(1e-300)
        r = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype)).item()) + 1
        out.append(min(len(s), -(-r // round_to) * round_to))
    return out[0], out[1]


def macs(layer: Layer, r_out: int, r_in: int) -> tuple[int, int]:
    """Multiply-adds per run of the dense conv and of its factorized form."""
    node = layer.uses[0].node
    x, y = node.args[0].meta.get("val"), node.meta.get("val")
    o, i = layer.shape[:2]
    kernel = math.prod(layer.shape[2:])
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        return o * i * kernel, params(o, i, kernel, r_out, r_in)
    pix_in, pix_out = math.prod(x.shape[2:]) * x.shape[0], math.prod(y.shape[2:]) * y.shape[0]
    dense = pix_out * o * i * kernel
    if kernel == 1:
        return dense, pix_out * r_out * (o + i)
    return dense, pix_in * r_in * i + pix_out * (r_out * r_in * kernel + o * r_out)


def unsupported(layer: Layer) -> str | None:
    """Why ``layer`` cannot be Tucker-factorized (None: it can)."""
    if layer.roles != {"conv"} or layer.transposed:
        return "convolution read in another orientation or by other ops"
    if layer.groups() != 1:
        return f"grouped/depthwise convolution (groups={layer.groups()}): no dense channel mode"
    for use in layer.uses:
        if conv_geometry(use.node, layer.shape) is None:
            return "convolution with symbolic or transposed hyper-parameters"
    return None


def _pointwise(x: Node, weight: Node, bias, spatial: int, ir: IR, before: Node) -> Node:
    with ir.graph.inserting_before(before):
        node = ir.graph.call_function(aten.convolution.default, (
            x, weight, bias, [1] * spatial, [0] * spatial, [1] * spatial, False,
            [0] * spatial, 1))
    node.meta = {k: v for k, v in before.meta.items() if k != "val"}
    return node


def factorize_conv(ir: IR, layer: Layer, r_out: int, r_in: int) -> Tensor:
    """Rewrite every use of the conv ``layer`` as its Tucker-2 (or, 1x1, SVD) factorization;
    returns the reconstructed weight (what the rewritten IR now computes)."""
    w = ir.get_weight(layer.weight_node).detach()
    o, i, *kernel = w.shape
    spatial = len(kernel)
    base = layer.weight_node.name.removeprefix("p_")
    ones = [1] * spatial
    if math.prod(kernel) == 1:
        with factorize.serial_lapack():
            u, s, vh = torch.linalg.svd(w.double().reshape(o, i), full_matrices=False)
        root = s[:r_out].sqrt()
        first = (root[:, None] * vh[:r_out]).float().reshape(r_out, i, *ones)
        last = (u[:, :r_out] * root[None, :]).float().reshape(o, r_out, *ones)
        middle = None
        approx = (last.reshape(o, r_out) @ first.reshape(r_out, i)).reshape(w.shape)
    else:
        t = tucker2(w, r_out, r_in)
        first = t.b.T.float().reshape(r_in, i, *ones).contiguous()
        middle = t.core.float().contiguous()
        last = t.a.float().reshape(o, r_out, *ones).contiguous()
        approx = t.reconstruct().float()
    first_node = ir.add_weight(f"{base}_tk_in", first)
    last_node = ir.add_weight(f"{base}_tk_out", last)
    middle_node = ir.add_weight(f"{base}_tk_core", middle) if middle is not None else None
    for use in layer.uses:
        node = use.node
        bias = node.args[2] if len(node.args) > 2 else None
        # the spatial conv keeps the op's stride/padding/dilation: the core, or (pointwise)
        # the first factor; a pointwise projection before it has no bias, so zero padding
        # after it is zero padding before it
        h, spatial_weight = node.args[0], first_node
        if middle_node is not None:
            h, spatial_weight = _pointwise(h, first_node, None, spatial, ir, node), middle_node
        with ir.graph.inserting_before(node):
            h = ir.graph.call_function(node.target, (h, spatial_weight, None, *node.args[3:]),
                                       dict(node.kwargs))
        h.meta = {k: v for k, v in node.meta.items() if k != "val"}
        out = _pointwise(h, last_node, bias, spatial, ir, node)
        out.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(out)
        for spec in ir.program.graph_signature.output_specs:
            if getattr(spec.arg, "name", None) == node.name:
                spec.arg.name = out.name
        ir.graph.erase_node(node)
    return approx
