"""Symbolic-length kernels go parallel at run time only above the threshold their rule uses
for fixed lengths (a 16-token layer norm stays on one thread, as in a fixed-length build), and
both copies of the guarded loop nest compute the same numbers."""

from __future__ import annotations

import numpy as np
import pytest

HIDDEN = 64


@pytest.fixture(scope="module")
def target():
    from slimc.targets import resolve_target

    return resolve_target("llvm").tvm_target()


def _norm_and_dense(n, weight: np.ndarray):
    """``layer_norm(x) @ W`` and ``x + 1`` over ``n`` rows of ``HIDDEN`` features."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, HIDDEN), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            one = relax.const(np.ones(HIDDEN, "float32"))
            zero = relax.const(np.zeros(HIDDEN, "float32"))
            normed = bb.emit(relax.op.nn.layer_norm(x, one, zero, axes=[-1]))
            dense = bb.emit(relax.op.matmul(normed, relax.const(weight)))
            shifted = bb.emit(relax.op.add(x, relax.const(1.0, "float32")))
            out = bb.emit_output(relax.Tuple([dense, shifted]))
        bb.emit_func_output(out)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("tir_var_upper_bound", {"n": 4096})
    return mod


@pytest.fixture(scope="module")
def weight():
    return np.random.default_rng(0).standard_normal((HIDDEN, HIDDEN)).astype("float32")


def test_guards_use_the_rules_thresholds(target, weight):
    import tvm
    from slimc.backends.tvm.schedules import apply_cpu_schedules, fusion_passes
    from slimc.backends.tvm.schedules.common import MIN_PARALLEL_MEMORY_WORK, MIN_WORK_KEY
    from slimc.backends.tvm.schedules.cpu_matmul import MATMUL_PARALLEL_WORK
    from tvm import tirx

    n = tirx.Var("n", "int64")
    with target, tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(fusion_passes(target))(_norm_and_dense(n, weight))
        mod = apply_cpu_schedules(mod, target)
    scripts = {g.name_hint: f.script() for g, f in mod.functions_items()
               if isinstance(f, tirx.PrimFunc)}
    assert scripts
    thresholds = set()
    for name, script in scripts.items():
        assert MIN_WORK_KEY not in script, name  # consumed by the guard, not left to codegen
        if "T.parallel" in script:
            assert "_serial" in script, name  # symbolic work: a serial copy beside it
            thresholds |= {t for t in (MIN_PARALLEL_MEMORY_WORK, MATMUL_PARALLEL_WORK)
                           if f">= T.int64({t}):" in script}
    # the norm / elementwise kernels test the memory-bound threshold, the matmul its own
    assert MIN_PARALLEL_MEMORY_WORK in thresholds, scripts
    assert MATMUL_PARALLEL_WORK in thresholds, scripts


@pytest.fixture(scope="module")
def built(target, weight, tmp_path_factory):
    import tvm
    from slimc.backends.tvm.schedules import cpu_pipeline
    from tvm import relax, tirx

    mod = _norm_and_dense(tirx.Var("n", "int64"), weight)
    with tvm.transform.PassContext(opt_level=3):
        ex = relax.build(mod, target=target, relax_pipeline=cpu_pipeline(target))
    path = tmp_path_factory.mktemp("thresholds") / "lib.so"
    ex.export_library(str(path))
    return path


@pytest.mark.parametrize("length", [1, 16, 4096])  # serial copies, and past every threshold
def test_both_copies_match_numpy(built, weight, length):
    from slimc.backends.tvm.runtime import NativeRunner

    x = np.random.default_rng(length).standard_normal((length, HIDDEN)).astype("float32")
    dense, shifted = NativeRunner(built, threads=2)([x])
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    expected = ((x - mean) / np.sqrt(var + 1e-5)) @ weight
    np.testing.assert_allclose(dense, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(shifted, x + 1, rtol=0, atol=0)
