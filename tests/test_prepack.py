"""Weights packed into kernel layouts in numpy, one at a time (issue 18: compile peak memory),
give exactly what TVM's own evaluation of the layout rewrite (``FoldConstant``) gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimc.targets import resolve_target


class Matmul(torch.nn.Module):
    """``x @ W`` with a constant ``W``, batched when ``W`` has 3 dimensions."""

    def __init__(self, *shape: int, dtype=torch.float32) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(*shape, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.w)


def _scheduled(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]):
    """The module lowered, fused and scheduled for the host: its weights await packing."""
    import tvm
    from slimc.backends.tvm.schedules import apply_cpu_schedules, fusion_passes
    from tvm.relax.frontend.torch import from_exported_program

    program = torch.export.export(module.eval(), inputs)
    mod = from_exported_program(program, keep_params_as_input=False)
    target = resolve_target("llvm").tvm_target()
    with target:
        mod = tvm.transform.Sequential(fusion_passes(target))(mod)
        return apply_cpu_schedules(mod, target), target


def _constants(mod) -> list[np.ndarray]:
    import tvm
    from tvm import relax

    found: list[np.ndarray] = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e.value.numpy()) if (
        isinstance(e, tvm.ir.expr.Constant) and hasattr(e.value, "shape")) else None)
    return found


def _prepack_calls(mod) -> list:
    from tvm import relax

    calls: list = []
    relax.analysis.post_order_visit(mod["main"], lambda e: calls.append(e) if (
        isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir"
        and e.args[0].name_hint.endswith("weight_prepack")) else None)
    return calls


CASES = {
    "linear": (torch.nn.Linear(48, 96), (torch.randn(2, 9, 48),)),
    "linear-wide": (torch.nn.Linear(40, 256, bias=False), (torch.randn(2, 16, 40),)),
    "batched": (Matmul(4, 24, 64), (torch.randn(4, 5, 24),)),
    "conv": (torch.nn.Conv2d(8, 64, 3, stride=2, padding=1), (torch.randn(1, 8, 12, 12),)),
    "fp16": (Matmul(32, 128, dtype=torch.float16),
             (torch.randn(6, 32, dtype=torch.float16),)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_numpy_packing_equals_tvm_layout_transform_bit_for_bit(case):
    import tvm
    from slimc.backends.tvm.schedules import _split_prepacked, prepack_passes
    from slimc.backends.tvm.schedules.prepack import pack_constants
    from tvm import relax

    torch.manual_seed(0)
    module, inputs = CASES[case]
    mod, target = _scheduled(module, inputs)
    with target:
        split = tvm.transform.module_pass(_split_prepacked, opt_level=0, name="Split")(mod)
        expected = tvm.transform.Sequential([
            relax.transform.FoldConstant(), relax.transform.DeadCodeElimination()])(split)
        got = tvm.transform.Sequential(prepack_passes())(mod)
        calls = _prepack_calls(split)
        assert calls, "nothing was packed: the case tests nothing"
        # numpy did every one of them (FoldConstant, which runs after it, had nothing left)
        prepack = {c.args[0] for c in calls}
        assert not _prepack_calls(pack_constants(split, prepack))
    want, have = _constants(expected), _constants(got)
    assert [(w.shape, w.dtype) for w in want] == [(h.shape, h.dtype) for h in have]
    for w, h in zip(want, have, strict=True):
        assert w.tobytes() == h.tobytes()


def test_packing_in_rounds_gives_the_same_weights(monkeypatch):
    """Several rounds (one weight each here; SmolLM2 packs an eighth of its weights per
    round) give exactly the one-pass result, and leave no layout rewrite behind."""
    import tvm
    from slimc.backends.tvm.schedules import _split_prepacked, prepack, prepack_passes
    from tvm import relax

    torch.manual_seed(0)
    module = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    mod, target = _scheduled(module, (torch.randn(2, 16, 64),))
    with target:
        split = tvm.transform.module_pass(_split_prepacked, opt_level=0, name="Split")(mod)
        assert len(_prepack_calls(split)) == 4
        expected = tvm.transform.Sequential([
            relax.transform.FoldConstant(), relax.transform.DeadCodeElimination()])(split)
        monkeypatch.setattr(prepack, "MIN_ROUND_BYTES", 1)
        monkeypatch.setattr(prepack, "PACK_ROUNDS", 1000)
        got = tvm.transform.Sequential(prepack_passes())(mod)
    assert not _prepack_calls(got)
    want, have = _constants(expected), _constants(got)
    assert [w.tobytes() for w in want] == [h.tobytes() for h in have]


def test_packed_weights_are_aligned_and_shared_with_tvm():
    """An int8 weight: the packed buffer is 64-byte aligned, and the constant shares it."""
    from slimc.backends.tvm.schedules.constant_views import _constant
    from slimc.backends.tvm.schedules.prepack import Permutation

    source = np.arange(2 * 64, dtype=np.int8).reshape(2, 64)
    plan = Permutation(split=(2, 2, 32), axes=(1, 0, 2), shape=(2, 2, 32))
    constant = _constant(plan.view(source))
    packed = np.from_dlpack(constant.value)
    assert packed.ctypes.data % 64 == 0 and packed.flags.c_contiguous
    np.testing.assert_array_equal(packed, source.reshape(2, 2, 32).transpose(1, 0, 2))
    assert np.from_dlpack(constant.value).ctypes.data == packed.ctypes.data
