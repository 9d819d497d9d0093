"""Symbolic-length attention kernels: whole tiles run without bounds checks, the key operand is
read in place (no padded copy), and the serial copy of a run-time-guarded loop nest has its own
scratch buffers (so TVM can still shrink the accumulator tile to registers)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def target():
    from slimc.targets import resolve_target

    return resolve_target("llvm").tvm_target()


def _attention(n):
    """``softmax(q @ k^T + mask) @ v`` for 2 heads of width 8, length ``n``."""
    from tvm import relax

    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((2, n, 8), "float32"))
    kt = relax.Var("kt", relax.TensorType((2, 8, n), "float32"))
    v = relax.Var("v", relax.TensorType((2, n, 8), "float32"))
    mask = relax.Var("mask", relax.TensorType((1, n, n), "float32"))
    with bb.function("main", [q, kt, v, mask]):
        with bb.dataflow():
            scores = bb.emit(relax.op.matmul(q, kt))
            probs = bb.emit(relax.op.nn.softmax(relax.op.add(scores, mask), axis=-1))
            out = bb.emit_output(relax.op.matmul(probs, v))
        bb.emit_func_output(out)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("tir_var_upper_bound", {"n": 512})
    return mod


def _scheduled(target):
    import tvm
    from slimc.backends.tvm.schedules import apply_cpu_schedules, fusion_passes
    from tvm import tirx

    with target, tvm.transform.PassContext(opt_level=3):
        fused = tvm.transform.Sequential(fusion_passes(target))(_attention(tirx.Var("n", "int64")))
        return apply_cpu_schedules(fused, target)


def _tile_splits(func) -> list:
    """The ``if whole tile: ... else: ...`` statements directly in a loop body."""
    import tvm_ffi
    from tvm import tirx

    found = []

    def on_for(loop):
        if isinstance(loop.body, tirx.IfThenElse) and loop.body.else_case is not None:
            found.append(loop.body)
        return loop

    tvm_ffi.structural_map(func.body, [(tirx.For, on_for)])
    return found


def _predicates(stmt) -> list:
    import tvm_ffi
    from tvm import s_tir, tirx

    found = []

    def on_realize(realize):
        if not (isinstance(realize.predicate, tirx.IntImm) and realize.predicate.value):
            found.append(realize.predicate)
        return realize

    tvm_ffi.structural_map(stmt, [(s_tir.SBlockRealize, on_realize)])
    return found


def test_whole_tiles_drop_the_checks_and_read_keys_in_place(target):
    from tvm import s_tir, tirx

    scheduled = _scheduled(target)
    matmuls = {g.name_hint: f for g, f in scheduled.functions_items()
               if isinstance(f, tirx.PrimFunc) and "matmul" in g.name_hint}
    assert len(matmuls) == 2, list(matmuls)
    for name, func in matmuls.items():
        s_tir.Schedule(func)  # well formed: one definition per variable
        script = func.script()
        # no padded operand copy
        assert "_pad[" not in script.replace("_pad_local", "").replace("_pad_global", ""), name
        splits = _tile_splits(func)
        assert splits, name
        for split in splits:
            assert not _predicates(split.then_case), name  # whole tiles: no bounds checks
            assert _predicates(split.else_case), name  # edge tiles keep them
            assert "T.min(" not in split.then_case.script()  # nor clamped indices
        # the serial copy of the run-time-guarded nest has its own accumulator tile
        # (global scope when under 1024 bytes: on the stack, see common.tile_buffer_scope)
        assert "_pad_global_serial = T.sblock_alloc_buffer" in script \
            or "_pad_local_serial = T.sblock_alloc_buffer" in script, name


@pytest.mark.parametrize("length", [1, 7, 16, 37, 64, 300])
def test_symbolic_attention_matches_numpy(target, length, built_attention):
    import tvm

    rng = np.random.default_rng(length)
    q = rng.standard_normal((2, length, 8)).astype("float32")
    kt = rng.standard_normal((2, 8, length)).astype("float32")
    v = rng.standard_normal((2, length, 8)).astype("float32")
    mask = np.where(rng.random((1, length, length)) < 0.2, -1e4, 0.0).astype("float32")
    got = built_attention["main"](*(tvm.runtime.tensor(a) for a in (q, kt, v, mask))).numpy()
    scores = q @ kt + mask
    e = np.exp(scores - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(got, (e / e.sum(-1, keepdims=True)) @ v, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def built_attention(target):
    import tvm
    from slimc.backends.tvm.schedules import cpu_pipeline
    from tvm import relax, tirx

    with tvm.transform.PassContext(opt_level=3):
        ex = relax.build(_attention(tirx.Var("n", "int64")), target=target,
                         relax_pipeline=cpu_pipeline(target))
    return relax.VirtualMachine(ex, tvm.cpu())
