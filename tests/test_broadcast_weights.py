"""A linear over a 3-D input PyTorch cannot view as 2-D (the heads' transpose of an attention
output) exports as ``expand(W)`` + ``bmm``; slimc folds the batch instead, so the weight is
stored once (``schedules/broadcast_weights.py``), on CPU and GPU targets alike."""

from __future__ import annotations

import numpy as np
import torch

from tests.test_schedules import _check, _lower


class HeadsThenLinear(torch.nn.Module):
    """BERT's attention output: attention (batch, heads, tokens, dim) -> (batch, tokens,
    heads * dim) -> Linear; PyTorch's matmul decomposition does not fold this batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(32, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, heads, tokens, dim = x.shape
        y = torch.nn.functional.scaled_dot_product_attention(x, x, x)
        return self.fc(y.transpose(1, 2).reshape(batch, tokens, heads * dim))


INPUTS = (torch.randn(4, 4, 8, 8),)


def _constant_shapes(mod) -> list[tuple[int, ...]]:
    from tvm import relax

    shapes: list[tuple[int, ...]] = []

    def visit(expr) -> None:
        value = getattr(expr, "value", None) if type(expr).__name__ in (
            "Constant", "GenericConst") else None
        if value is not None and hasattr(value, "numpy"):
            shapes.append(tuple(value.numpy().shape))

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return shapes


def _folded_constants(passes) -> list[tuple[int, ...]]:
    import tvm
    from tvm import relax

    from slimc.targets import resolve_target

    with resolve_target("llvm").tvm_target():
        mod = tvm.transform.Sequential(passes + [
            relax.transform.LegalizeOps(), relax.transform.FoldConstant()])(
                _lower(HeadsThenLinear().eval(), INPUTS))
    return _constant_shapes(mod)


def test_the_export_broadcasts_the_weight_over_the_batch():
    """The premise: without the pass the weight is folded into a (4, 32, 24) constant."""
    assert (4, 32, 24) in _folded_constants([])


def test_the_weight_is_stored_once_and_the_result_is_exact(tmp_path, caplog):
    from slimc.backends.tvm.schedules.broadcast_weights import fold_broadcast_weights
    from slimc.backends.tvm.schedules.nhwc_rewrites import drop_noop_broadcasts

    shapes = _folded_constants([drop_noop_broadcasts, fold_broadcast_weights])
    assert (32, 24) in shapes and not [s for s in shapes if len(s) == 3]
    torch.manual_seed(0)
    _check(HeadsThenLinear().eval(), INPUTS, tmp_path, caplog, rule=None)


def test_a_weight_broadcast_along_its_own_rows_is_left_alone():
    """``broadcast_to(W (1, N), (B, K, N))`` also widens W itself: not a folded batch."""
    import tvm
    from slimc.backends.tvm.schedules.broadcast_weights import fold_broadcast_weights
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = bb.emit(relax.op.broadcast_to(relax.const(np.ones((1, 6), "float32")),
                                              (4, 16, 6)))
            out = bb.emit_output(bb.emit(relax.op.matmul(x, w)))
        bb.emit_func_output(out)
    mod = fold_broadcast_weights(bb.get())
    assert "broadcast_to" in mod.script()
    assert isinstance(mod, tvm.IRModule)
