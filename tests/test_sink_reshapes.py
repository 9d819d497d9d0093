"""A transformer MLP's activation fuses into its matmul although ``nn.Linear`` on a 3-D input
is exported as ``reshape -> matmul -> reshape`` (``sink_reshapes``)."""

from __future__ import annotations

import pytest
import torch

from slimc.targets import resolve_target
from tests.test_schedules import _check, _lower

F = torch.nn.functional


class Mlp(torch.nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = torch.nn.Linear(24, 64), torch.nn.Linear(64, 24), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _kernels(module, inputs) -> list[str]:
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes

    target = resolve_target("llvm").tvm_target()
    with target:
        fused = tvm.transform.Sequential(fusion_passes(target))(_lower(module, inputs))
    return [gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


@pytest.mark.parametrize("act", [F.gelu, F.silu, F.hardswish])
def test_activation_fuses_into_the_matmul(act, tmp_path, caplog):
    torch.manual_seed(0)
    module, inputs = Mlp(act).eval(), (torch.randn(2, 7, 24),)
    kernels = _kernels(module, inputs)
    # every activation sits in a matmul kernel; no kernel is only a reshape + activation
    assert not [k for k in kernels if "matmul" not in k and any(
        a in k for a in ("gelu", "silu", "relu", "tanh", "maximum", "minimum", "clip"))], kernels
    _check(module, inputs, tmp_path, caplog, "tiled-matmul", tol=1e-5)


class Scores(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return q @ k.transpose(1, 2)


def test_narrow_panel_axis_is_padded_to_full_vectors(tmp_path, caplog):
    """180 keys: only a 4-wide panel divides them; the rule pads to whole vector panels
    (``cpu_matmul._pad_symbolic_tiles``) and the result still matches PyTorch."""
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes, schedule_prim_func

    torch.manual_seed(0)
    inputs = (torch.randn(2, 24, 16), torch.randn(2, 180, 16))
    _check(Scores(), inputs, tmp_path, caplog, "tiled-matmul", tol=1e-5)
    target = resolve_target("llvm").tvm_target()
    with target:
        fused = tvm.transform.Sequential(fusion_passes(target))(_lower(Scores(), inputs))
    texts = [schedule_prim_func(f, target, name=gv.name_hint).script()
             for gv, f in fused.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in gv.name_hint]
    assert texts and any("_pad" in t for t in texts), texts


class Residual(torch.nn.Module):
    """A pre-norm transformer MLP with its residual connection, the add in either order, or
    an add that broadcasts (``extra`` of shape ``(24,)``) which must stay where it is."""

    def __init__(self, order: str) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(24)
        self.fc1, self.fc2 = torch.nn.Linear(24, 64), torch.nn.Linear(64, 24)
        self.order = order
        self.extra = torch.nn.Parameter(torch.randn(24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(F.gelu(self.fc1(self.norm(x))))
        if self.order == "broadcast":
            return y + self.extra
        if self.order == "relu":  # an activation between the linear and the residual add
            return x + torch.relu(y)
        return x + y if self.order == "left" else y + x


def _named_kernels(module, inputs, target: str = "x86-64-v4-vnni") -> list[str]:
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes

    tvm_target = resolve_target(target).tvm_target()
    with tvm_target:
        fused = tvm.transform.Sequential(fusion_passes(tvm_target))(_lower(module, inputs))
    return [gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


@pytest.mark.parametrize("order", ["left", "right", "relu"])
def test_residual_add_fuses_into_the_matmul(order, tmp_path, caplog):
    """``x + fc2(h)`` (or ``x + relu(fc2(h))``): the add of two same-shape tensors sinks past
    the reshape into fc2's epilogue (one matmul kernel with two adds: bias and residual); no
    kernel is a lone ``reshape + add``; the built library matches PyTorch."""
    torch.manual_seed(0)
    module, inputs = Residual(order).eval(), (torch.randn(2, 7, 24),)
    kernels = _named_kernels(module, inputs)
    assert not [k for k in kernels if "add" in k and "matmul" not in k], kernels
    assert [k for k in kernels if "matmul" in k and k.count("add") == 2], kernels
    _check(module, inputs, tmp_path, caplog, "tiled-matmul", tol=1e-5, target="x86-64-v4-vnni")


def test_broadcasting_add_is_not_moved(tmp_path, caplog):
    """``fc2(h) + b`` with ``b`` of shape ``(24,)`` broadcasts: reshaping ``b`` to the matmul's
    2-D shape would be wrong, so the rule leaves it (the result still matches PyTorch)."""
    from slimc.backends.tvm.schedules.sink_reshapes import sink_reshapes

    torch.manual_seed(0)
    module, inputs = Residual("broadcast").eval(), (torch.randn(2, 7, 24),)
    mod = _lower(module, inputs)
    before, after = mod["main"].script(), sink_reshapes(mod)["main"].script()
    # only the GELU's reshape moved; the last add still adds ``b`` to the 3-D reshape of
    # fc2's output
    assert before != after
    assert after.count("R.add(") == before.count("R.add(")
    last_add = [line for line in after.splitlines() if "R.add(" in line][-1]
    assert "R.Tensor((2, 7, 24)" in last_add, last_add
    _check(module, inputs, tmp_path, caplog, "tiled-matmul", tol=1e-5, target="x86-64-v4-vnni")


class EagerAttention(torch.nn.Module):
    """HF MobileViT's eager attention: heads folded into the batch for the matmuls, the scores
    viewed as ``(batch, heads, n, n)`` and scaled by a scalar after the view."""

    def __init__(self, heads: int, op: str) -> None:
        super().__init__()
        self.heads, self.op = heads, op

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n, d = q.shape[-2], q.shape[-1]
        scores = (q @ k.transpose(1, 2)).view(-1, self.heads, n, n)
        if self.op == "divide":
            scores = scores / d**0.5
        else:
            scores = d**-0.5 * scores
        return torch.softmax(scores, dim=-1).view(-1, n, n) @ v


@pytest.mark.parametrize("op", ["divide", "multiply"])
def test_scalar_scale_after_a_view_fuses_into_the_matmul(op, tmp_path, caplog):
    """``view(q @ k^T) / sqrt(d)``: the division by a scalar sinks past the view into the
    scores matmul's epilogue; no kernel is a lone ``reshape + divide`` (one more pass over the
    widest tensor of the layer); the built library matches PyTorch."""
    torch.manual_seed(0)
    module = EagerAttention(2, op).eval()
    inputs = tuple(torch.randn(4, 40, 12) for _ in range(3))
    kernels = _named_kernels(module, inputs)
    assert not [k for k in kernels if op in k and "matmul" not in k], kernels
    assert [k for k in kernels if op in k and "matmul" in k], kernels
    _check(module, inputs, tmp_path, caplog, "tiled-matmul", tol=1e-5, target="x86-64-v4-vnni")


def test_tensor_scale_after_a_view_is_not_moved():
    """A divisor with more than one element would pair with other elements once the view is
    moved: it stays after the reshape."""
    from slimc.backends.tvm.schedules.sink_reshapes import sink_reshapes

    class PerHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.rand(1, 2, 1, 1) + 1)

        def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return (q @ k.transpose(1, 2)).view(-1, 2, 40, 40) / self.scale

    inputs = tuple(torch.randn(4, 40, 12) for _ in range(2))
    mod = _lower(PerHead().eval(), inputs)
    after = sink_reshapes(mod)["main"].script()
    divide = next(line for line in after.splitlines() if "R.divide(" in line)
    assert "R.Tensor((2, 2, 40, 40)" in divide, divide


class BiasedAttention(torch.nn.Module):
    """LeViT's attention: scaled scores plus a learned ``[heads, n, n]`` bias table (gathered
    per head pair), broadcast over the batch of one, then softmax and ``P @ V``."""

    def __init__(self, heads: int, n: int) -> None:
        super().__init__()
        self.heads = heads
        self.bias = torch.nn.Parameter(torch.randn(heads, n, n))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = (q @ k.transpose(-2, -1)).view(1, self.heads, q.shape[-2], k.shape[-2])
        return torch.softmax(scores * 0.25 + self.bias, dim=-1).view_as(scores[0]) @ v


@pytest.mark.parametrize("n", [40, 36])  # 36 keys: padded to whole vectors for the softmax
def test_bias_table_add_fuses_into_the_score_matmul(n, tmp_path, caplog, monkeypatch):
    """With ``SINK_SAME_ELEMENT_ADDS`` (off by default: slower on LeViT's score kernels),
    ``view(q @ k^T) * s + bias`` with ``bias`` of the scores' elements (no leading batch dim):
    the add pairs the same elements before and after the view, so it sinks into the
    scores matmul's epilogue with the scale; no kernel is a lone ``reshape + add``."""
    import importlib

    monkeypatch.setattr(importlib.import_module("slimc.backends.tvm.schedules.sink_reshapes"),
                        "SINK_SAME_ELEMENT_ADDS", True)
    torch.manual_seed(0)
    module = BiasedAttention(2, n).eval()
    inputs = (torch.randn(2, n, 16), torch.randn(2, n, 16), torch.randn(2, n, 8))
    kernels = _named_kernels(module, inputs)
    assert not [k for k in kernels if "add" in k and "matmul" not in k], kernels
    assert [k for k in kernels if "matmul" in k and "multiply" in k and "add" in k], kernels
    _check(module, inputs, tmp_path, caplog, "tiled-matmul", tol=1e-5, target="x86-64-v4-vnni")


def test_add_that_broadcasts_over_the_view_is_not_moved(monkeypatch):
    """A bias with fewer elements than the scores (one row, broadcast over the queries) would
    pair with other elements once the view is moved: the add stays after the reshape."""
    import importlib

    from slimc.backends.tvm.schedules.sink_reshapes import sink_reshapes

    monkeypatch.setattr(importlib.import_module("slimc.backends.tvm.schedules.sink_reshapes"),
                        "SINK_SAME_ELEMENT_ADDS", True)

    class RowBias(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.randn(2, 1, 40))

        def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return (q @ k.transpose(1, 2)).view(1, 2, 40, 40) + self.bias

    inputs = tuple(torch.randn(2, 40, 12) for _ in range(2))
    after = sink_reshapes(_lower(RowBias().eval(), inputs))["main"].script()
    add = next(line for line in after.splitlines() if "R.add(" in line)
    assert "R.Tensor((1, 2, 40, 40)" in add, add
