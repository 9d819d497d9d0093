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


@pytest.mark.parametrize("act", [F.gelu, F.silu])
def test_activation_fuses_into_the_matmul(act, tmp_path, caplog):
    torch.manual_seed(0)
    module, inputs = Mlp(act).eval(), (torch.randn(2, 7, 24),)
    kernels = _kernels(module, inputs)
    # every activation sits in a matmul kernel; no kernel is only a reshape + activation
    assert not [k for k in kernels if "matmul" not in k and any(
        a in k for a in ("gelu", "silu", "relu", "tanh"))], kernels
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
