"""CPU kernels at a symbolic (dynamic) length: whole vectors with the tail peeled off, softmax
scratch rows shared, and the same numbers as numpy at lengths that are and are not multiples
of the vector width."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def target():
    from slimc.targets import resolve_target

    return resolve_target("llvm").tvm_target()


def _attention_tail(n):
    """``softmax(scores + mask) `` and a head transpose whose last axis is the length."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, n, n), "float32"))
    mask = relax.Var("mask", relax.TensorType((1, 1, n, n), "bool"))
    v = relax.Var("v", relax.TensorType((1, n, 2, 8), "float32"))
    with bb.function("main", [x, mask, v]):
        with bb.dataflow():
            bias = bb.emit(relax.op.where(mask, relax.const(0.0, "float32"),
                                          relax.const(-1e4, "float32")))
            probs = bb.emit(relax.op.nn.softmax(relax.op.add(x, bias), axis=-1))
            heads = bb.emit(relax.op.permute_dims(v, [0, 2, 3, 1]))
            out = bb.emit_output(relax.Tuple([probs, heads]))
        bb.emit_func_output(out)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("tir_var_upper_bound", {"n": 512})
    return mod


def _reference(x, mask, v):
    scores = x + np.where(mask, 0.0, -1e4).astype("float32")
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True), v.transpose(0, 2, 3, 1)


def test_symbolic_tails_are_marked_for_peeling(target):
    import tvm
    from slimc.backends.tvm.schedules import apply_cpu_schedules, fusion_passes
    from slimc.backends.tvm.schedules.common import vars_in
    from slimc.backends.tvm.schedules.symbolic_tails import PARTITION_HINT, _all_blocks, _predicate
    from tvm import s_tir, tirx

    n = tirx.Var("n", "int64")
    with target, tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(fusion_passes(target))(_attention_tail(n))
        mod = apply_cpu_schedules(mod, target)
    kernels = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert kernels
    peeled = 0
    for func in kernels:
        script = func.script()
        assert "T.vectorized" in script  # a symbolic innermost axis is still vectorized
        sch = s_tir.Schedule(func)
        for block in _all_blocks(sch):
            loops = sch.get_loops(block)
            predicate = _predicate(sch, block, loops[-1]) if loops else None
            if predicate is None or "n" not in {v.name for v in vars_in(predicate)}:
                continue
            # every predicate on the length sits under a loop LoopPartition will split
            assert any(PARTITION_HINT in sch.get(lp).annotations for lp in loops), script
            peeled += 1
    assert peeled >= 2  # softmax rows and the transposed heads
    # Work that depends on the length: parallel or serial is chosen at run time, and both
    # copies of the loop nest are well formed TIR (one definition per variable).
    guarded = [f for f in kernels if "_serial" in f.script()]
    assert guarded and all("T.parallel" in f.script() for f in guarded)


@pytest.mark.parametrize("length", [1, 7, 37, 64, 300])
def test_symbolic_kernels_match_numpy(target, length, built_attention_tail):
    import tvm

    rng = np.random.default_rng(length)
    x = rng.standard_normal((1, 2, length, length)).astype("float32")
    mask = rng.random((1, 1, length, length)) > 0.3
    v = rng.standard_normal((1, length, 2, 8)).astype("float32")
    got = built_attention_tail["main"](*(tvm.runtime.tensor(a) for a in (x, mask, v)))
    want = _reference(x, mask, v)
    np.testing.assert_allclose(got[0].numpy(), want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[1].numpy(), want[1])


@pytest.fixture(scope="module")
def built_attention_tail(target):
    import tvm
    from slimc.backends.tvm.schedules import cpu_pipeline
    from tvm import relax, tirx

    with tvm.transform.PassContext(opt_level=3):
        executable = relax.build(_attention_tail(tirx.Var("n", "int64")), target=target,
                                 relax_pipeline=cpu_pipeline(target))
    return relax.VirtualMachine(executable, tvm.cpu())


def _dense_and_scores(n):
    """A dense layer (constant weight) and attention scores at a symbolic number of rows."""
    from tvm import relax

    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, 16), "float32"))
    q = relax.Var("q", relax.TensorType((2, n, 8), "float32"))
    k = relax.Var("k", relax.TensorType((2, 8, n), "float32"))
    w = rng.standard_normal((16, 48)).astype("float32")
    b = rng.standard_normal(48).astype("float32")
    weight, bias = relax.const(w), relax.const(b)
    with bb.function("main", [x, q, k]):
        with bb.dataflow():
            dense = bb.emit(relax.op.add(relax.op.matmul(x, weight), bias))
            scores = bb.emit(relax.op.matmul(q, k))
            out = bb.emit_output(relax.Tuple([dense, scores]))
        bb.emit_func_output(out)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("tir_var_upper_bound", {"n": 512})
    return mod, w, b


def test_padded_rows_are_read_in_place(target):
    """The rows operand of a symbolic-length matmul is read with a clamped index (no padded
    copy); every kernel stays well formed TIR."""
    import tvm
    from slimc.backends.tvm.schedules import apply_cpu_schedules, cpu_pipeline, fusion_passes
    from tvm import relax, s_tir, tirx

    n = tirx.Var("n", "int64")
    mod, weight, bias = _dense_and_scores(n)
    with target, tvm.transform.PassContext(opt_level=3):
        fused = tvm.transform.Sequential(fusion_passes(target))(mod)
        scheduled = apply_cpu_schedules(fused, target)
    scripts = {g.name_hint: f.script() for g, f in scheduled.functions_items()
               if isinstance(f, tirx.PrimFunc)}
    for name, script in scripts.items():
        s_tir.Schedule(scheduled[name])  # well formed (one definition per variable)
        assert "x_pad[" not in script and "q_pad[" not in script, name
        assert "T.min(" in script, name  # rows past the length read the last row

    with tvm.transform.PassContext(opt_level=3):
        vm = relax.VirtualMachine(relax.build(_dense_and_scores(tirx.Var("n", "int64"))[0],
                                              target=target, relax_pipeline=cpu_pipeline(target)),
                                  tvm.cpu())
    rng = np.random.default_rng(1)
    for length in (1, 7, 37, 300):
        x = rng.standard_normal((length, 16)).astype("float32")
        q = rng.standard_normal((2, length, 8)).astype("float32")
        k = rng.standard_normal((2, 8, length)).astype("float32")
        got = vm["main"](*(tvm.runtime.tensor(a) for a in (x, q, k)))
        np.testing.assert_allclose(got[0].numpy(), x @ weight + bias, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[1].numpy(), q @ k, rtol=1e-4, atol=1e-4)
