"""The attention softmax overwrites its scores; its exp-sum runs in four vector accumulators.

The row kernel of :mod:`slimc.backends.tvm.schedules.attention_softmax` writes the
probabilities over the ``heads x L x L`` scores (``call_tir_inplace``) when nothing else reads
them: scores built by the padded ``Q @ K^T`` chain, or a fresh result read only by the softmax
(and SDPA's all -inf check, which the kernel absorbs). A model input, or scores read a second
time, keep a new output tensor. Real TVM builds, results against PyTorch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimc.isa import check_cpu, library_isa
from slimc.targets import resolve_target
from tests.test_lane_reductions import Attention, _fused_main, _kernels
from tests.test_schedules import Norms, _build_run, _check, _lower


@pytest.fixture(autouse=True)
def _separate_kernels(monkeypatch):
    """These tests are about the separate softmax kernel; at their lengths the fused attention
    (``fused_attention``, tested in tests/test_fused_attention.py) would replace it."""
    from slimc.backends.tvm.schedules import fused_attention

    monkeypatch.setattr(fused_attention, "ENABLED", False)



class BiasedAttention(torch.nn.Module):
    """T5's eager attention: ``softmax(Q @ K^T + position_bias) @ V`` (no scaling)."""

    def __init__(self, heads: int, length: int) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(1, heads, length, length))

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) + self.bias, -1) @ v


class ScoresReadTwice(torch.nn.Module):
    """The scores feed the softmax and a second reader: they must survive the softmax."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) * 0.25
        return torch.softmax(scores, -1) @ v, scores.sum(-1)


def _inplace_calls(fused) -> list[str]:
    """The kernels ``main`` calls through ``call_tir_inplace``."""
    import tvm
    from tvm import relax

    names: list[str] = []

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == \
                "relax.call_tir_inplace":
            names.append(expr.args[0].name_hint)

    for _, func in fused.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    assert all(isinstance(fused[n], tvm.tirx.PrimFunc) for n in names)
    return names


@pytest.mark.parametrize("length", [1500, 256])
def test_sdpa_softmax_overwrites_its_scores(length, tmp_path, caplog):
    """SDPA with Whisper's 1500 keys (padded to 1536: the scores are the padded chain's) and
    T5's 256 (whole vectors: the guarded softmax of the imported scores): the row kernel runs
    in place, one buffer argument, and the attention matches PyTorch."""
    torch.manual_seed(0)
    inputs = tuple(torch.randn(1, 2, length, 16) * 2 for _ in range(3))
    fused, _ = _fused_main(Attention(), inputs)
    assert _inplace_calls(fused) == ["safe_softmax_rows"], fused["main"].script()
    assert len(_kernels(fused)["safe_softmax_rows"].params) == 1
    _check(Attention(), inputs, tmp_path, caplog, None, tol=1e-5, target="x86-64-v4-vnni")


def test_biased_softmax_overwrites_its_scores(tmp_path, caplog):
    """T5's position bias added to the scores before a plain softmax (256 keys): in place."""
    torch.manual_seed(0)
    module = BiasedAttention(2, 256)
    inputs = tuple(torch.randn(1, 2, 256, 16) for _ in range(3))
    fused, _ = _fused_main(module, inputs)
    assert _inplace_calls(fused) == ["softmax_rows"], fused["main"].script()
    _check(module, inputs, tmp_path, caplog, None, tol=1e-5, target="x86-64-v4-vnni")


@pytest.mark.parametrize("length", [256, 100])
def test_scores_read_twice_keep_their_values(length, tmp_path, caplog):
    """Scores also read by a row sum after the softmax: 256 keys (the softmax writes a new
    tensor) and 100 (padded: the chain's own scores are overwritten, the originals stay for
    the second reader); both outputs match PyTorch."""
    torch.manual_seed(0)
    inputs = tuple(torch.randn(1, 2, length, 16) for _ in range(3))
    fused, _ = _fused_main(ScoresReadTwice(), inputs)
    assert _inplace_calls(fused) == ([] if length == 256 else ["padded_softmax_rows"])
    _check(ScoresReadTwice(), inputs, tmp_path, caplog, None, tol=1e-5,
           target="x86-64-v4-vnni")


def test_softmax_of_a_model_input_leaves_the_input(tmp_path):
    """A softmax straight over the model's input writes a new tensor: the caller's array is
    the same after the call, the result PyTorch's."""
    import tvm
    from slimc.backends.tvm.build import build_library
    from tvm import relax

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 512) * 3
    module = Norms("softmax", 512)
    fused, _ = _fused_main(module, (x,))
    assert _inplace_calls(fused) == [] and "softmax_rows" in _kernels(fused)
    library = build_library(_lower(module, (x,)), resolve_target("x86-64-v4-vnni"),
                            tmp_path / "k.so")
    check_cpu(library_isa(library), str(library))  # an AVX2 host: skipped, not SIGILL
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    given = tvm.runtime.tensor(x.numpy())
    got = vm["main"](given)
    got = (got if hasattr(got, "numpy") else got[0]).numpy()
    np.testing.assert_array_equal(given.numpy(), x.numpy())
    np.testing.assert_allclose(got, torch.softmax(x, -1).numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n,valid,inplace", [(1536, 1500, True), (1536, 1500, False),
                                             (208, 197, True), (48, 48, True), (80, 66, False)])
def test_row_kernel_alone_matches_numpy(n, valid, inplace):
    """The row kernel built alone (AVX-512, 16 lanes): exp-sum accumulators of 4 vectors when
    the row has at least 4 whole ones (1536: 23 groups + 1, 208: 3 + 0 ... 12 whole vectors),
    else one (48 keys); partial vectors, zero tails, in place or not, against numpy."""
    import tvm
    from slimc.backends.tvm.schedules.attention_softmax import EXP_ACCUMULATORS, softmax_rows

    rows = 37
    func = softmax_rows(rows, n, valid, True, 16, inplace=inplace)
    text = func.script()
    whole = valid // 16
    width = 16 * (EXP_ACCUMULATORS if whole >= EXP_ACCUMULATORS else 1)
    assert f"alloc_buffer(({width},))" in text, text
    assert len(func.params) == (1 if inplace else 2)
    from tests.w8a8_reference import runs_here

    if not runs_here("x86-64-v4-vnni"):  # an AVX2 host: SIGILL, not a failure of the kernel
        pytest.skip("this CPU cannot run x86-64-v4-vnni code")
    target = resolve_target("x86-64-v4-vnni").tvm_target()
    with tvm.transform.PassContext(opt_level=3):
        lib = tvm.tirx.build(func.with_attr("global_symbol", "sm"), target=target)
    x = np.random.default_rng(0).standard_normal((rows, n)).astype("float32") * 4
    x[3, :valid] = -np.inf  # an all -inf row: zeros (the safe softmax's check)
    given = tvm.runtime.tensor(x)
    if inplace:
        lib["sm"](given)
        got = given.numpy()
    else:
        out = tvm.runtime.tensor(np.full_like(x, np.nan))
        lib["sm"](given, out)
        got = out.numpy()
        np.testing.assert_array_equal(given.numpy(), x)
    v = x[:, :valid].astype(np.float64)
    with np.errstate(invalid="ignore"):
        e = np.exp(v - v.max(-1, keepdims=True))
        want = e / e.sum(-1, keepdims=True)
    want[3] = 0.0
    np.testing.assert_allclose(got[:, :valid], want, rtol=2e-6, atol=1e-7)
    assert not got[:, valid:].any()


def test_inplace_softmax_on_aarch64_under_qemu(tmp_path, aarch64_emulator):
    """NEON (4 lanes): the biased softmax of 64 keys in place and SDPA over 30 keys (padded to
    32) under qemu, against PyTorch."""
    torch.manual_seed(0)
    cases = [(BiasedAttention(2, 64), tuple(torch.randn(1, 2, 64, 8) for _ in range(3))),
             (Attention(), tuple(torch.randn(1, 2, 30, 8) for _ in range(3)))]
    for module, inputs in cases:
        fused, _ = _fused_main(module, inputs, target="arm")
        assert len(_inplace_calls(fused)) == 1, fused["main"].script()
        got, _ = _build_run(module, inputs, tmp_path, target="arm", cross="aarch64-linux-gnu")
        with torch.no_grad():
            want = module(*inputs).numpy()
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)


class ConstantSoftmax(torch.nn.Module):
    """A softmax of a tensor computed from weights alone (folded to a constant at build)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(2, 256) * 3)

    def forward(self, x):
        return x * torch.softmax(self.w * 2.0, -1)


def test_softmax_of_constants_is_not_overwritten(tmp_path):
    """Scores from weights alone are a constant (folded before the pass, or by the
    ``FoldConstant`` after it, which the pass's ``_reads_an_input`` guards against): the
    softmax never writes over them, and a second call gives the first call's result."""
    import tvm
    from slimc.backends.tvm.build import build_library
    from tvm import relax

    torch.manual_seed(0)
    module, x = ConstantSoftmax(), torch.randn(2, 256)
    fused, _ = _fused_main(module, (x,))
    assert _inplace_calls(fused) == []
    library = build_library(_lower(module, (x,)), resolve_target("x86-64-v4-vnni"),
                            tmp_path / "k.so")
    check_cpu(library_isa(library), str(library))  # an AVX2 host: skipped, not SIGILL
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    with torch.no_grad():
        want = module(x).numpy()
    for _ in range(2):
        got = vm["main"](tvm.runtime.tensor(x.numpy()))
        got = (got if hasattr(got, "numpy") else got[0]).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
