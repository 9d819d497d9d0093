"""``F.interpolate`` with a scale factor that does not give a whole number of pixels, and the
resize modes TVM 0.27 has no converter for: found by the session-24 hunt (``scale_factor=1.5``
nearest was refused by the build-time check, rel. L2 0.7). Real TVM build, one compile."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import slimc


class _Resizes(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return (F.interpolate(x, scale_factor=1.5, mode="nearest"),
                F.interpolate(x, scale_factor=(1.5, 0.7), mode="bilinear"),
                F.interpolate(x, scale_factor=1.3, mode="bicubic", align_corners=False),
                F.interpolate(x, scale_factor=1.5, mode="nearest-exact"),
                F.interpolate(x, size=(3, 4), mode="bilinear", antialias=True),
                F.interpolate(x, scale_factor=2, mode="bilinear"))  # whole pixels: TVM's resize


def resizes():
    """Factory (``tests.test_resize_scales:resizes``)."""
    return _Resizes().eval(), (torch.randn(1, 2, 5, 6),)


def test_fractional_scale_factors_and_antialias_compute_what_torch_does(tmp_path):
    """Through a factory with a dynamic batch: the factory loader used to drop the ``1..4``
    range and write a fixed-size artifact without a word; and only the resized axes need
    static sizes for the exact lowering."""
    result = slimc.compile_model("tests.test_resize_scales:resizes", slimc.CompileOptions(
        target="x86", output=tmp_path / "resize", inputs=["x=1..4x2x5x6:float32"]))
    compiled = slimc.load(result.output)
    assert compiled.inputs[0]["dims"][0] == {"name": "batch", "min": 1, "max": 4}
    module = _Resizes().eval()
    fresh = torch.randn(3, 2, 5, 6)  # a batch and values the build was not checked on
    got = list(compiled(fresh.numpy()).values())
    want = module(fresh)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5)
