"""Average pools whose one window covers the whole input are lowered as a ``mean``.

Hugging Face's EfficientNet ends in ``AvgPool2d(hidden_dim, ceil_mode=True)`` (a 1280-wide
window on a 7x7 map): TVM's pool kernel walked the whole window, 16 s of a 16.2 s call.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from slimc.backends.tvm.legalize import legalize

import slimc
from slimc.ir import IR

aten = torch.ops.aten


class PooledNet(torch.nn.Module):
    """A whole-window 2-D pool (clipped by ``ceil_mode``), an exact-size 1-D one, and an
    ordinary strided pool that must stay a pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.whole = torch.nn.AvgPool2d(64, ceil_mode=True)
        self.whole_1d = torch.nn.AvgPool1d(49)
        self.strided = torch.nn.AvgPool2d(2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        flat = self.whole(y).flatten(1) + self.whole_1d(y.flatten(2)).flatten(1)
        return flat + self.strided(y).mean((-2, -1))


def pooled_net():
    torch.manual_seed(0)
    return PooledNet().eval(), (torch.randn(1, 3, 7, 7),)


def test_whole_window_pools_become_means_with_the_same_values():
    model, args = pooled_net()
    ir = IR(torch.export.export(model, args))
    fired = legalize(ir)
    assert fired["whole_window_avg_pool_to_mean"] == 2, fired
    targets = [n.target for n in ir.nodes("call_function")]
    assert targets.count(aten.avg_pool2d.default) == 1  # the strided pool is left alone
    assert aten.avg_pool1d.default not in targets
    (got,) = ir.run(list(args))
    torch.testing.assert_close(got, model(*args), rtol=1e-5, atol=1e-6)


def test_whole_window_pool_artifact_matches_pytorch(tmp_path):
    result = slimc.compile_model("tests.test_whole_window_pool:pooled_net", slimc.CompileOptions(
        output=tmp_path / "out", threads=2))
    manifest = json.loads((result.output / "manifest.json").read_text())
    assert manifest["verification"]["passed"], manifest["verification"]
    model, args = pooled_net()
    compiled = slimc.load(result.output)
    (name,) = compiled.example_inputs()
    (out,) = compiled(**{name: args[0].numpy()}).values()
    np.testing.assert_allclose(out, model(*args).detach().numpy(), rtol=1e-5, atol=1e-6)
