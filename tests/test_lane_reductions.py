"""Row reductions summed in vector lanes (``RowReduction``'s ``rfactor`` accumulators).

Layer norm, RMS norm and softmax rows of the lengths real models use, built with slimc's
pipeline and compared with PyTorch; the scheduled kernels are checked for the shape of the
lane reduction (``rfactor`` blocks under the row loop, vectorized at the target's width),
and a few are rebuilt for aarch64 (NEON, 4 lanes) and run under qemu.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from slimc.targets import resolve_target
from tests.test_schedules import Norms, _build_run, _check, _lower


@pytest.fixture(autouse=True)
def _separate_kernels(monkeypatch):
    """These tests are about the separate softmax kernel; at their lengths the fused attention
    (``fused_attention``, tested in tests/test_fused_attention.py) would replace it."""
    from slimc.backends.tvm.schedules import fused_attention

    monkeypatch.setattr(fused_attention, "ENABLED", False)



def _scheduled(module, inputs, target: str = "llvm") -> list[str]:
    """TVMScript of every row-reduction kernel of ``module``, as the CPU rules schedule it."""
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes, schedule_prim_func

    spec = resolve_target(target).tvm_target()
    with spec:
        fused = tvm.transform.Sequential(fusion_passes(spec))(_lower(module, inputs))
    return [schedule_prim_func(f, spec, name=gv.name_hint).script()
            for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


@pytest.mark.parametrize("kind,shape", [
    ("layernorm", (1, 197, 384)),   # ViT-Small: 4 accumulators of 16 lanes
    ("rmsnorm", (2, 3, 576)),       # SmolLM2
    ("softmax", (1, 2, 9, 1500)),   # Whisper: 1500 = 375 x 4 lanes
    ("softmax", (1, 3, 5, 197)),    # ViT: a prime row keeps the scalar chain
    ("layernorm", (3, 40)),         # shorter than two chunks of 16
])
def test_lane_reductions_match_pytorch(kind, shape, tmp_path, caplog):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3 + 1  # an offset mean: the variance pass must subtract it
    _check(Norms(kind, shape[-1]), (x,), tmp_path, caplog, "row-reduction", tol=1e-5)


def _lane_widths(text: str) -> list[int]:
    """Widths of the vectorized loops that update ``rfactor`` partials."""
    pattern = r"T\.vectorized\(T\.int64\((\d+)\)\):\s*\n\s*with T\.sblock\(\"\w+_rf_update"
    return [int(match.group(1)) for match in re.finditer(pattern, text)]


def _vector_widths(text: str) -> set[int]:
    """Widths of every vectorized loop (the row kernel's)."""
    return {int(w) for w in re.findall(r"T\.vectorized\((\d+)\)", text)}


def test_layer_norm_is_reduced_in_lanes_on_x86_and_neon():
    x = (torch.randn(1, 197, 384),)
    for target, lanes in (("llvm", None), ("arm", 4)):
        texts = [t for t in _scheduled(Norms("layernorm", 384), x, target) if "_rf" in t]
        assert texts, target
        widths = _lane_widths(texts[0])
        # sum and variance: k accumulators of a vector each, then one vector
        assert len(widths) == 4, texts[0]
        if lanes is not None:
            assert widths == [4 * lanes, lanes] * 2, widths
        else:
            assert widths[1] in (4, 8, 16) and widths[0] == 4 * widths[1], widths
        # the partials are computed per row: no row-sized scratch buffer
        assert "T.parallel" in texts[0] or target == "arm"


def test_prime_rows_keep_the_scalar_chain():
    texts = _scheduled(Norms("softmax", 197), (torch.randn(1, 2, 7, 197),))
    assert texts and not any("_rf" in t for t in texts)


def test_lane_reductions_on_aarch64_under_qemu(tmp_path, aarch64_emulator):
    torch.manual_seed(0)
    for kind, shape in (("layernorm", (2, 3, 96)), ("softmax", (1, 2, 3, 36))):
        module = Norms(kind, shape[-1])
        x = torch.randn(*shape) * 2 + 0.5
        got, _ = _build_run(module, (x,), tmp_path, target="arm", cross="aarch64-linux-gnu")
        with torch.no_grad():
            want = module(x).numpy()
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)


def _lowered(module, inputs, target: str) -> list[str]:
    """The row kernels of ``module`` scheduled, then lowered by the passes of TVM's TIR
    pipeline (``tvm.s_tir.pipeline``, what ``relax.build`` runs) up to ``VectorizeLoop``: the
    int64 -> int32 ``NarrowDataType`` before ``LoopPartition`` is the order that matters."""
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes, schedule_prim_func
    from tvm import s_tir, tirx

    spec = resolve_target(target).tvm_target()
    with spec:
        fused = tvm.transform.Sequential(fusion_passes(spec))(_lower(module, inputs))
    passes = tvm.transform.Sequential([
        s_tir.transform.CanonicalizeLoop(), s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerMatchBuffer(), s_tir.transform.StmtSimplify(),
        s_tir.transform.LowerOpaqueBlock(), tirx.transform.FlattenBuffer(),
        tirx.transform.NarrowDataType(32), s_tir.transform.LoopPartition(),
        tirx.transform.VectorizeLoop(True), tirx.transform.StmtSimplify()])
    texts = []
    for gv, func in fused.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            func = schedule_prim_func(func, spec, name=gv.name_hint)
            mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
            with spec, tvm.transform.PassContext(opt_level=3):
                texts.append(passes(mod)["main"].script())
    return texts


@pytest.mark.parametrize("kind,n", [("softmax", 1500), ("softmax", 197), ("layernorm", 1500)])
def test_row_tail_is_split_off_whole_vectors(kind, n):
    """A constant row that is not whole vectors (Whisper's 1500, ViT's 197) is vectorized in
    whole vectors with the last partial vector in a loop of its own. Left predicated, every
    step was scalarized (TVM's partition hint was dropped by ``NarrowDataType``) and LLVM
    rebuilt the softmax normalize step from gathers and scatters across rows."""
    lanes = 16  # x86-64-v4: AVX-512
    shape = (1, 2, 3, n) if kind == "softmax" else (1, 5, n)
    texts = [t for t in _lowered(Norms(kind, n), (torch.randn(*shape),), "x86-64-v4")
             if "T.Ramp" in t]
    assert texts
    text = "\n".join(texts)
    whole, rest = divmod(n, lanes)
    # elementwise steps (softmax: exp and normalize; layer norm: the output) in a loop of whole
    # 16-lane vectors, no predicate inside; predicated, they were scalar loops of 16 steps
    assert re.search(rf"in range\({whole}\):", text), text
    ramps = re.findall(rf"T\.Ramp\([^\n]*?, 1, {lanes}\)\]? = ", text)
    stores = len(re.findall(rf"\[[^\n\]]*:[^\n\]]*\+ {lanes}\] = ", text))
    assert stores >= (2 if kind == "softmax" else 1), (ramps, text)
    assert f"< {rest}" in text  # the tail: its own scalar loop


def test_row_tail_has_no_gathers(tmp_path):
    """The built softmax over a 197-long row has no gather/scatter instructions."""
    import subprocess

    from slimc.backends.tvm.build import build_library
    from tvm.relax.frontend.torch import from_exported_program

    x = torch.randn(1, 2, 7, 197)
    mod = from_exported_program(torch.export.export(Norms("softmax", 197), (x,)),
                                keep_params_as_input=False)
    lib = build_library(mod, resolve_target("x86-64-v4"), tmp_path / "softmax.so")
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)],
                         capture_output=True, text=True, check=True).stdout
    assert "vgather" not in asm and "vscatter" not in asm
    assert re.search(r"\bvmovups\s+%zmm", asm) or re.search(r"%zmm\d+,\s*\(", asm)


class Attention(torch.nn.Module):
    """``scaled_dot_product_attention`` (decomposed with PyTorch's ``_safe_softmax``), or
    written out with a plain softmax (``manual``)."""

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.manual = manual

    def forward(self, q, k, v):
        if self.manual:
            return torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


#: The safe softmax's all -inf row test on its exp-sum (the row kernel's ``total``).
_ROW_TEST = r"total < T\.float32\(0\.5\)"


def _fused_main(module, inputs, target: str = "x86-64-v4-vnni"):
    """The fused Relax module of ``module`` (slimc's passes up to ``FuseTIR``) and its target."""
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes

    spec = resolve_target(target).tvm_target()
    with spec:
        return tvm.transform.Sequential(fusion_passes(spec))(_lower(module, inputs)), spec


def _kernels(fused) -> dict:
    import tvm

    return {gv.name_hint: f for gv, f in fused.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc)}


def test_sdpa_all_masked_row_check_is_in_the_softmax_kernel():
    """SDPA's "safe" softmax is one kernel: no second reduction over the scores
    (``equal -> logical_not -> max``), and the keys of Whisper's 1500 are padded to whole
    chunks of 4 x 16 lanes (1536), the K and V head transposes writing the zero padding. The
    softmax is the hand-written row kernel: the maximum in 4 x 16 lanes, then 16-lane ``exp``
    and sum, the all -inf row test on the sum, the last 12 valid keys masked by lane."""
    q, k, v = (torch.randn(1, 2, 1500, 16) for _ in range(3))
    fused, spec = _fused_main(Attention(), (q, k, v))
    kernels = _kernels(fused)
    assert not [n for n in kernels if "equal" in n or "where" in n], list(kernels)
    softmax = [n for n in kernels if "safe_softmax" in n]
    assert softmax == ["safe_softmax_rows"], list(kernels)
    assert [n for n in kernels if n.endswith("pad") or "_pad" in n], list(kernels)
    main = fused["main"].script()
    assert "(3000, 1536)" in main and "(2, 1536, 16)" in main, main  # rows x padded keys
    text = kernels[softmax[0]].script()
    assert kernels[softmax[0]].attrs["tirx.is_scheduled"]
    assert _vector_widths(text) == {16, 64}, text
    assert re.search(_ROW_TEST, text), text  # the all -inf row test
    assert "lane < 12" in text and "T.parallel" in text, text


@pytest.mark.parametrize("length", [100, 197, 64])
def test_sdpa_softmax_matches_pytorch(length, tmp_path, caplog):
    """Padded keys (100 -> 112, ViT's 197 -> 208) and whole-vector keys (64: not padded)."""
    torch.manual_seed(0)
    inputs = tuple(torch.randn(1, 3, length, 16) * 2 for _ in range(3))
    _check(Attention(), inputs, tmp_path, caplog, None, tol=1e-5, target="x86-64-v4-vnni")


def test_plain_softmax_attention_is_padded_without_the_check(tmp_path, caplog):
    """A softmax written out between ``Q @ K^T`` and ``@ V`` gets the padded keys too, without
    the all -inf row test (a plain softmax has none)."""
    torch.manual_seed(0)
    inputs = tuple(torch.randn(1, 2, 100, 16) for _ in range(3))
    fused, spec = _fused_main(Attention(manual=True), inputs)
    kernels = _kernels(fused)
    names = [n for n in kernels if "padded_softmax" in n]
    assert names == ["padded_softmax_rows"], list(kernels)
    text = kernels[names[0]].script()
    # 100 keys of 112: 6 whole vectors and 4 valid lanes of the seventh
    assert not re.search(_ROW_TEST, text) and "lane < 4" in text, text
    _check(Attention(manual=True), inputs, tmp_path, caplog, None, tol=1e-5,
           target="x86-64-v4-vnni")


class MaskedAttention(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_sdpa_masked_rows_keep_pytorchs_semantics(tmp_path, caplog):
    """A query row masked out entirely (all -inf) gives zeros, as PyTorch's safe softmax does;
    a row under Hugging Face's additive mask (-3.4e38, finite) stays uniform -- the fused test
    looks at the exp-sum, not at the maximum (TVM's starts at -3.4e38)."""
    torch.manual_seed(0)
    length, low = 40, torch.finfo(torch.float32).min
    q, k, v = (torch.randn(1, 2, length, 16) for _ in range(3))
    mask = torch.where(torch.rand(1, 1, length, length) > 0.3, 0.0, float("-inf"))
    mask[..., 5, :] = float("-inf")  # every key masked: zeros
    mask[..., 7, :] = low  # the finite padding mask: a uniform row
    mask[..., 9, 3:] = low
    with torch.no_grad():
        want = MaskedAttention()(q, k, v, mask)
    assert want[0, :, 5].abs().sum() == 0 and want[0, :, 7].abs().sum() > 0
    _check(MaskedAttention(), (q, k, v, mask), tmp_path, caplog, None, tol=1e-5,
           target="x86-64-v4-vnni")
    fused, _ = _fused_main(MaskedAttention(), (q, k, v, mask))
    assert not [n for n in _kernels(fused) if "equal" in n], list(_kernels(fused))


def test_masked_attention_pads_the_mask_with_the_keys(tmp_path, caplog):
    """A mask added to the scores (ViT's all-zero one, BERT's padding mask) is padded along
    with the keys (197 -> 208); the rows keep PyTorch's values, an all -inf row its zeros."""
    torch.manual_seed(0)
    length = 197
    q, k, v = (torch.randn(1, 2, length, 16) for _ in range(3))
    mask = torch.where(torch.rand(1, 1, length, length) > 0.2, 0.0, float("-inf"))
    mask[..., 4, :] = float("-inf")
    fused, _ = _fused_main(MaskedAttention(), (q, k, v, mask))
    names = list(_kernels(fused))
    assert [n for n in names if "safe_softmax" in n] and not [n for n in names if "equal" in n]
    assert "(394, 208)" in fused["main"].script(), fused["main"].script()  # rows x keys
    _check(MaskedAttention(), (q, k, v, mask), tmp_path, caplog, None, tol=1e-5,
           target="x86-64-v4-vnni")


def test_row_kernel_vectors_on_aarch64():
    """On NEON (4 lanes) the row kernel's maximum runs in 4 x 4 lanes, ``exp``, sum and scale
    in 4: the same kernel shape as on AVX-512, at the target's vector width."""
    q, k, v = (torch.randn(1, 2, 256, 16) for _ in range(3))
    fused, _ = _fused_main(Attention(), (q, k, v), target="arm-v8.2")
    kernels = _kernels(fused)
    assert list(n for n in kernels if "softmax" in n) == ["safe_softmax_rows"], list(kernels)
    text = kernels["safe_softmax_rows"].script()
    assert _vector_widths(text) == {4, 16}, text
    assert re.search(_ROW_TEST, text) and "lane <" not in text, text  # 256 keys: no partial


@pytest.mark.parametrize("target", ["x86-64-v4-vnni", "x86-64-v3"])
def test_row_kernel_matches_pytorch_at_long_rows(target, tmp_path, caplog):
    """Whisper-like 1500 keys (padded to 1536 with 12 valid lanes in the last vector on
    AVX-512; to 1504 with 4 valid of 8 on AVX2) and T5-like 256 (no padding) against
    PyTorch."""
    torch.manual_seed(0)
    for length in (1500, 256):
        inputs = tuple(torch.randn(1, 2, length, 16) * 2 for _ in range(3))
        _check(Attention(), inputs, tmp_path, caplog, None, tol=1e-5, target=target)


def test_row_kernel_masked_rows_keep_pytorchs_semantics(tmp_path, caplog):
    """64 keys (whole vectors: the row kernel without padding) under a mask with an all -inf
    row (zeros) and a finite Hugging Face mask row (uniform)."""
    torch.manual_seed(0)
    length, low = 64, torch.finfo(torch.float32).min
    q, k, v = (torch.randn(1, 2, length, 16) for _ in range(3))
    mask = torch.where(torch.rand(1, 1, length, length) > 0.3, 0.0, float("-inf"))
    mask[..., 5, :] = float("-inf")
    mask[..., 7, :] = low
    fused, _ = _fused_main(MaskedAttention(), (q, k, v, mask))
    assert "safe_softmax_rows" in _kernels(fused), list(_kernels(fused))
    _check(MaskedAttention(), (q, k, v, mask), tmp_path, caplog, None, tol=1e-5,
           target="x86-64-v4-vnni")


class ExpandedAttention(torch.nn.Module):
    """MobileViT's attention: 4-D ``matmul``s export as ``expand`` + ``bmm``, leaving no-op
    ``broadcast_to``s around the softmax."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.softmax(q @ k.transpose(-1, -2) * 0.1, -1) @ v


@pytest.mark.parametrize("shape", [(4, 4, 256, 256), (2, 4, 64, 256)])
def test_softmax_rows_in_chunks_keep_the_row_rule(shape, tmp_path, caplog, monkeypatch):
    """Softmax rows of 256 in chunks of 16 rows (one scratch allocation each): the row rule
    schedules them (it fell back to naive loops before, 4x ONNX Runtime on MobileViT), exact.
    (Such whole-vector rows now run the row kernel; the rule is checked with it off.)"""
    from slimc.backends.tvm.schedules import attention_softmax

    monkeypatch.setattr(attention_softmax, "PLAIN_SOFTMAX_ROWS", False)
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3
    _check(Norms("softmax", shape[-1]), (x,), tmp_path, caplog, "row-reduction", tol=1e-5)


def test_noop_broadcasts_leave_the_graph(tmp_path, caplog):
    """``broadcast_to`` onto the tensor's own shape is dropped before fusion: no kernel of the
    attention carries one, and the result is exact."""
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 36) for _ in range(3))
    spec = resolve_target("x86-64-v4-vnni").tvm_target()
    with spec, tvm.transform.PassContext(opt_level=3):
        fused = tvm.transform.Sequential(fusion_passes(spec))(
            _lower(ExpandedAttention(), (q, k, v)))
    names = [g.name_hint for g, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert names and not [n for n in names if "broadcast_to" in n], names
    _check(ExpandedAttention(), (q, k, v), tmp_path, caplog, ("tiled-matmul", "row-reduction"),
           tol=1e-5)


@pytest.mark.parametrize("shape", [(4, 4, 256, 256), (1, 2, 8, 512)])
def test_plain_softmax_over_whole_vectors_runs_the_row_kernel(shape, tmp_path, caplog):
    """Eager attention's softmax (no SDPA check) over long rows of whole vectors (MobileViT's
    first 256 keys) is the hand-written row kernel, without the all -inf row test, and no
    TE softmax kernel is left; the result matches PyTorch. Short rows (64 keys, where the row
    kernel measured slower) keep TVM's softmax."""
    torch.manual_seed(0)
    short, _ = _fused_main(Norms("softmax", 64), (torch.randn(4, 4, 64, 64),))
    assert not [n for n in _kernels(short) if "softmax_rows" in n], list(_kernels(short))
    x = torch.randn(*shape) * 3
    fused, _ = _fused_main(Norms("softmax", shape[-1]), (x,))
    kernels = _kernels(fused)
    names = [n for n in kernels if "softmax" in n]
    assert names == ["softmax_rows"], list(kernels)
    text = kernels["softmax_rows"].script()
    assert kernels["softmax_rows"].attrs["tirx.is_scheduled"]
    assert 16 in _vector_widths(text) and not re.search(_ROW_TEST, text), text
    _check(Norms("softmax", shape[-1]), (x,), tmp_path, caplog, None, tol=1e-5,
           target="x86-64-v4-vnni")
