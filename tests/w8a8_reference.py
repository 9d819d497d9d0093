"""Shared pieces of the W8A8 convolution tests: the one-op model, its integer inputs, the
int64 numpy reference, and the check that a compiled artifact reproduces it bit for bit.

``tests/test_w8a8_conv.py`` (awkward dense / grouped / 1-D shapes) and
``tests/test_cnn_nhwc_int8.py`` (depthwise channel-lane kernel, NHWC blocks) both use them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

import slimc
import slimc.dialect  # noqa: F401  (registers torch.ops.slimc.conv_w8a8)


class W8A8Conv(nn.Module):
    """One ``slimc::conv_w8a8`` with random integer weights and power-of-two scales."""

    def __init__(self, spec, zero_point: int, seed: int = 0) -> None:
        super().__init__()
        c, o, kernel, stride, padding, dilation, groups, _, _ = spec
        g = torch.Generator().manual_seed(seed)
        reduction = c // groups * int(np.prod(kernel))
        self.register_buffer("qweight", torch.randint(-127, 128, (o, reduction), generator=g,
                                                      dtype=torch.int8))
        # Per-channel input multipliers 0.5 / 1 / 2 (exact in float; 0.5 makes ties).
        self.register_buffer("in_mult", 2.0 ** torch.randint(-1, 2, (c,), generator=g).float())
        self.register_buffer("out_scale", 2.0 ** -torch.randint(4, 10, (o,), generator=g).float())
        self.geometry = [list(kernel), list(stride), list(padding), list(dilation), groups]
        self.zero_point = zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.slimc.conv_w8a8(x, self.qweight, self.in_mult, self.out_scale, None,
                                         *self.geometry, self.zero_point)


def make_input(spec, seed: int = 1) -> torch.Tensor:
    """Integer-valued inputs, some beyond the int8 range (clipped), with ties after in_mult."""
    c, _, kernel, *_, h, w = spec
    shape = (2, c, w) if len(kernel) == 1 else (2, c, h, w)
    return torch.randint(-300, 300, shape, generator=torch.Generator().manual_seed(seed)).float()


def integer_reference(model: W8A8Conv, x: np.ndarray) -> np.ndarray:
    """The convolution in int64 numpy: codes ``clip(round_half_even(x * m) + zp) - zp``."""
    kernel, stride, padding, dilation, groups = model.geometry
    codes = np.clip(np.round(x * model.in_mult.numpy().reshape(1, -1, *[1] * len(kernel)))
                    + model.zero_point, -128, 127).astype(np.int64) - model.zero_point
    if len(kernel) == 1:
        codes, kernel, stride, dilation = codes[:, :, None], [1, *kernel], [1, *stride], \
            [1, *dilation]
        padding = [0, 0, *padding]
    codes = np.pad(codes, [(0, 0), (0, 0), (padding[0], padding[1]), (padding[2], padding[3])])
    n, c, h, w = codes.shape
    weight = model.qweight.numpy().astype(np.int64)
    o = weight.shape[0]
    weight = weight.reshape(o, c // groups, *kernel)
    ho = (h - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    out = np.zeros((n, o, ho, wo), np.int64)
    og, cg = o // groups, c // groups
    for oc in range(o):
        g = oc // og
        for i in range(kernel[0]):
            for j in range(kernel[1]):
                patch = codes[:, g * cg:(g + 1) * cg,
                              i * dilation[0]: i * dilation[0] + stride[0] * (ho - 1) + 1:
                              stride[0],
                              j * dilation[1]: j * dilation[1] + stride[1] * (wo - 1) + 1:
                              stride[1]]
                out[:, oc] += np.einsum("nchw,c->nhw", patch, weight[oc, :, i, j])
    y = out.astype(np.float64) * model.out_scale.numpy().astype(np.float64)[None, :, None, None]
    return y[:, :, 0] if len(model.geometry[0]) == 1 else y


def assert_artifact_matches_integer_reference(output: Path, convs: Sequence[W8A8Conv],
                                              inputs: Sequence[torch.Tensor],
                                              labels: Iterable[str]) -> None:
    """Run the artifact at ``output`` once on ``inputs`` (one per convolution, in its input
    order) and require every output to equal :func:`integer_reference` bit for bit."""
    artifact = slimc.load(output)
    names = list(artifact.example_inputs())
    feed = {n: x.numpy() for n, x in zip(names, inputs, strict=True)}
    outputs = list(artifact(**feed).values())
    for conv, x, got, label in zip(convs, inputs, outputs, labels, strict=True):
        np.testing.assert_array_equal(got, integer_reference(conv, x.numpy()).astype(np.float32),
                                      err_msg=label)


def runs_here(target: str) -> bool:
    """Whether code built for the named ``target`` runs natively on this machine (its
    architecture, and every CPU feature the target's level needs)."""
    from slimc.isa import host_arch, missing_features, required_isa
    from slimc.targets import resolve_target

    isa = required_isa(resolve_target(target))
    return isa.get("arch") in (None, host_arch()) and not missing_features(isa)
