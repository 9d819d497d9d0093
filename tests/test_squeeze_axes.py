"""A ``squeeze`` at a negative axis after the convs (Hugging Face's ``AdaptiveAvgPool1d``
pooler: FocalNet, Swin) no longer stops the NHWC conversion of the whole model
(``squeeze_axes``: TVM's ConvertLayout failed with ``std::bad_alloc`` there, and every conv of
FocalNet-T stayed NCHW). Real TVM builds, compared with PyTorch."""

from __future__ import annotations

import torch

from tests.test_schedules import _check
from tests.test_vision_schedules import _fused


class PooledConvs(torch.nn.Module):
    """A strided 2 x 2 patch-merging conv and a 1 x 1 conv, then HF's 1-D pooler over the
    flattened tokens: ``AdaptiveAvgPool1d(1)`` is ``expand_dims(-2)``, a mean, ``squeeze(-2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.merge = torch.nn.Conv2d(16, 32, 2, stride=2)
        self.point = torch.nn.Conv2d(32, 32, 1)
        self.pool = torch.nn.AdaptiveAvgPool1d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.gelu(self.point(self.merge(x)))
        tokens = y.flatten(2)  # (batch, channels, tokens)
        return torch.flatten(self.pool(tokens), 1)


def test_negative_squeeze_keeps_the_convs_channels_last(tmp_path, caplog):
    import tvm

    torch.manual_seed(0)
    net = PooledConvs().eval()
    inputs = (torch.randn(1, 16, 28, 28),)
    convs = [f.script() for g, f in _fused(net, inputs).functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in g.name_hint]
    assert convs
    # the merging conv reads the image channels last (28 x 28 x 16), not NCHW (16 x 28 x 28)
    assert any("T.int64(28), T.int64(28), T.int64(16)" in text for text in convs), convs[0][:800]
    assert not any("T.int64(16), T.int64(28), T.int64(28)" in text for text in convs)
    _check(net, inputs, tmp_path, caplog, None, tol=1e-5)
