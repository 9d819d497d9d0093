"""Hidden channels of inverted-residual blocks padded to whole vectors (``channel_padding``).

MobileNetV3's 72 / 120 / 184 / 200-channel hidden maps are not whole AVX-512 vectors; the
pass gives the expansion conv zero output filters, the depthwise conv zero filters and the
projection zero input rows, so the map is 80 / 128 / 192 / 208 channels wide and the block's
output is unchanged. Real captures (batch norms folded as slimc's lowering does), real TVM
builds, compared with PyTorch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

F = torch.nn.functional


class SqueezeExciteBlock(torch.nn.Module):
    """MobileNetV3 block: 1x1 expand + BN + hard-swish, depthwise k x k + BN + ReLU, squeeze-
    excite (mean, FC + ReLU, FC + hard-sigmoid, gate), 1x1 project + BN, residual."""

    def __init__(self, cin: int = 24, hidden: int = 72, k: int = 5, escape: bool = False):
        super().__init__()
        self.expand = torch.nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(hidden)
        self.dw = torch.nn.Conv2d(hidden, hidden, k, 1, k // 2, groups=hidden, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(hidden)
        self.fc1 = torch.nn.Conv2d(hidden, 24, 1)
        self.fc2 = torch.nn.Conv2d(24, hidden, 1)
        self.project = torch.nn.Conv2d(hidden, cin, 1, bias=False)
        self.bn3 = torch.nn.BatchNorm2d(cin)
        self.escape = escape

    def forward(self, x: torch.Tensor):
        y = F.hardswish(self.bn1(self.expand(x)))
        d = torch.relu(self.bn2(self.dw(y)))
        s = F.hardsigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(d, 1)))))
        out = x + self.bn3(self.project(d * s))
        return (out, d) if self.escape else out


def _net(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    net = SqueezeExciteBlock(**kw)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def _lowered(net, x):
    """The Relax module slimc's compiler builds from ``net`` (batch norms folded)."""
    from slimc.backends.tvm.lower import lower_to_relax

    from slimc.capture import capture
    from slimc.loaders.base import LoadedModel

    ir, _ = capture(LoadedModel(name="block", module=net, example_inputs={"x": x}))
    return lower_to_relax(ir)


def _after_padding(mod, target: str):
    """``mod`` after slimc's fusion passes up to the channel padding, for ``target``."""
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes

    from slimc.targets import resolve_target

    spec = resolve_target(target).tvm_target()
    passes = fusion_passes(spec)
    stop = [p.info.name for p in passes].index("SlimcPadHiddenChannels") + 1
    with spec, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(passes[:stop])(mod)


def _convs(mod) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """``(groups, weight shape, output shape)`` of every conv2d in ``main``."""
    from tvm import relax

    found = []

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", None) == "relax.nn.conv2d":
            found.append((int(e.attrs.groups), tuple(int(d) for d in e.args[1].ty.shape),
                          tuple(int(d) for d in e.ty.shape)))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def _run(mod, x, tmp_path, target: str = "x86-64-v4-vnni") -> list[np.ndarray]:
    from slimc.backends.tvm.build import build_library
    from slimc.backends.tvm.runtime import run_library

    from slimc.targets import resolve_target

    library = build_library(mod, resolve_target(target), tmp_path / "k.so")
    return run_library(library, [x.numpy()], cross_triple=None, threads=2)


def _cpuinfo_avx512() -> bool:
    try:
        return " avx512f" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def test_hidden_map_is_padded_to_whole_vectors_and_exact(tmp_path):
    """72 hidden channels on AVX-512 (16 lanes): the expansion writes 80 channels (zero
    filters), the depthwise conv and the squeeze-excite FCs run on 80, the projection reads
    80 rows (zero for the padding) and writes the block's 24 channels; exact against PyTorch.
    On AVX2 (8 lanes divide 72) nothing changes."""
    net, x = _net(), torch.randn(1, 24, 14, 14)
    mod = _lowered(net, x)
    convs = _convs(_after_padding(mod, "x86-64-v4-vnni"))
    expand, dw, fc1, fc2, project = convs
    assert expand[1] == (1, 1, 24, 80) and expand[2][-1] == 80, convs
    assert dw[0] == 80 and dw[1] == (5, 5, 1, 80), convs
    assert fc1[1] == (1, 1, 80, 24) and fc2[1] == (1, 1, 24, 80), convs
    assert project[1] == (1, 1, 80, 24) and project[2] == (1, 14, 14, 24), convs
    assert [c[0] for c in _convs(_after_padding(mod, "x86-64-v3"))][1] == 72
    if not _cpuinfo_avx512():
        pytest.skip("the padded build runs only on an AVX-512 host")
    (got,) = _run(mod, x, tmp_path)
    with torch.no_grad():
        want = net(x).numpy()
    assert got.shape == want.shape
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_hidden_map_read_outside_the_block_is_not_padded(tmp_path):
    """When the hidden map is also an output of the function, padding would change what the
    caller gets: the block is left at 72 channels, and stays exact."""
    net, x = _net(escape=True), torch.randn(1, 24, 14, 14)
    mod = _lowered(net, x)
    assert all(c[2][-1] != 80 for c in _convs(_after_padding(mod, "x86-64-v4-vnni")))
    if not _cpuinfo_avx512():
        pytest.skip("needs an AVX-512 host to run the x86-64-v4 build")
    got = _run(mod, x, tmp_path)
    with torch.no_grad():
        want = [t.numpy() for t in net(x)]
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert np.linalg.norm(g - w) / np.linalg.norm(w) < 1e-5


def test_whole_vector_hidden_maps_are_left_alone():
    """96 hidden channels (6 whole AVX-512 vectors, MobileNetV2's): nothing to pad."""
    net, x = _net(hidden=96, k=3), torch.randn(1, 24, 14, 14)
    before = _convs(_lowered(net, x))
    after = _convs(_after_padding(_lowered(net, x), "x86-64-v4-vnni"))
    assert [c[0] for c in after] == [c[0] for c in before]
    assert after[1][0] == 96
