"""Compile-speed changes keep results identical (issue 16): constants folded in numpy, W8A8
candidates scored with integer matmuls, and ``-j/--jobs``.

Each change replaced a slower way of computing the same thing, so each test compares the new
path with the old one on real TVM builds or a reference evaluation written out here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from slimc.backends.tvm.schedules.constant_views import fold_constant_views
from slimc.passes.quantize.activations import _ranges, static_int8
from slimc.passes.quantize.formats import quantize_int8

import slimc
from slimc.errors import UsageError
from slimc.jobs import compile_jobs, resolve_jobs

FOLDED_OPS = ("relax.permute_dims", "relax.reshape", "relax.astype", "relax.sum",
              "relax.multiply", "relax.strided_slice", "relax.arange", "relax.zeros",
              "relax.nn.pad", "relax.sqrt")


def _weight_module():
    """A Relax function applying every op the fold handles to constants, then to the input."""
    from tvm import relax

    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, size=(6, 4)).astype("int8")
    weight = rng.standard_normal((4, 6)).astype("float32")
    table = rng.standard_normal((1, 10)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((3, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            wt = bb.emit(relax.op.permute_dims(relax.const(weight)))  # [6, 4]
            wide = bb.emit(relax.op.astype(relax.const(codes), "int32"))
            sums = bb.emit(relax.op.sum(wide, axis=[1]))  # [6] int32
            shifted = bb.emit(relax.op.multiply(sums, relax.const(-7, "int32")))
            as_float = bb.emit(relax.op.astype(shifted, "float32"))
            flat = bb.emit(relax.op.reshape(wt, (24,)))
            back = bb.emit(relax.op.reshape(flat, (6, 4)))
            part = bb.emit(relax.op.strided_slice(relax.const(table), axes=[1], begin=[2],
                                                  end=[6]))  # [1, 4]
            steps = bb.emit(relax.op.astype(relax.op.arange(0, 4, 1, "int64"), "float32"))
            zero = bb.emit(relax.op.zeros((4,), "float32"))
            # int4 codes padded to whole groups (uint8), and a float pad with a value
            packed = bb.emit(relax.op.nn.pad(relax.const(codes.view("uint8")), [0, 0, 0, 2]))
            packed = bb.emit(relax.op.astype(relax.op.strided_slice(
                packed, axes=[1], begin=[2], end=[6]), "float32"))  # [6, 4]
            wide_w = bb.emit(relax.op.nn.pad(relax.const(weight), [1, 0, 0, 0],
                                             pad_value=0.5))  # [5, 6]
            edge = bb.emit(relax.op.strided_slice(wide_w, axes=[0], begin=[0], end=[1]))
            y = bb.emit(relax.op.matmul(x, back))  # [3, 4]
            y = bb.emit(relax.op.add(y, relax.op.add(part, relax.op.add(steps, zero))))
            y = bb.emit(relax.op.add(y, relax.op.matmul(x, packed)))  # [3, 4]
            y = bb.emit(relax.op.add(y, relax.op.strided_slice(edge, axes=[1], begin=[0],
                                                               end=[4])))
            z = bb.emit(relax.op.matmul(x, relax.op.reshape(as_float, (6, 1))))
            out = bb.emit_output(relax.op.add(y, z))
        bb.emit_func_output(out)
    return bb.get()


def _ops_on_constants(mod) -> list[str]:
    import tvm
    from tvm import relax

    found = []

    def visit(expr) -> None:
        if (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)
                and expr.op.name in FOLDED_OPS
                and any(isinstance(a, tvm.ir.expr.Constant) for a in expr.args)):
            found.append(expr.op.name)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


def _run(mod, x: np.ndarray, fold: bool) -> np.ndarray:
    import tvm
    from slimc.backends.tvm.schedules import cpu_pipeline
    from tvm import relax

    target = tvm.target.Target({"kind": "llvm"})
    if fold:
        with target:
            mod = fold_constant_views()(mod)
        assert _ops_on_constants(mod) == []  # all evaluated in numpy
    else:
        # The old pipeline: the same, with TVM's FoldConstant doing the work instead.
        import slimc.backends.tvm.schedules.constant_views as views

        original = views.fold_call
        views.fold_call = lambda call: None
    try:
        with tvm.transform.PassContext(opt_level=3):
            exe = relax.build(mod, target=target, relax_pipeline=cpu_pipeline(target))
    finally:
        if not fold:
            views.fold_call = original
    vm = relax.VirtualMachine(exe, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_constants_folded_in_numpy_give_the_values_tvm_computed():
    mod = _weight_module()
    assert _ops_on_constants(mod)  # the layout ops on weights are there to fold
    x = np.random.default_rng(1).standard_normal((3, 6)).astype("float32")
    new, old = _run(mod, x, fold=True), _run(mod, x, fold=False)
    assert np.array_equal(new, old)


def test_square_roots_of_constants_folded_in_numpy_are_bit_identical():
    """``sqrt(var + eps)`` of a batch norm left unfolded (DenseNet's pre-activation norms):
    numpy's square roots are the bits TVM's compiled ``llvm.sqrt`` kernel gave, over variances
    spanning 1e-30..1e30 (subnormal-adjacent to huge) and the exact squares."""
    from tvm import relax

    rng = np.random.default_rng(2)
    var = np.concatenate([10.0 ** rng.uniform(-30, 30, 1000), np.arange(24) ** 2.0])
    var = var.astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, var.size), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            std = bb.emit(relax.op.sqrt(relax.op.add(relax.const(var),
                                                     relax.const(1e-5, "float32"))))
            out = bb.emit_output(relax.op.divide(x, std))
        bb.emit_func_output(out)
    mod = bb.get()
    assert "R.sqrt" in mod.script()
    import tvm

    with tvm.target.Target({"kind": "llvm"}):
        assert "R.sqrt" not in fold_constant_views()(mod).script()  # numpy computed it
    x = rng.standard_normal((2, var.size)).astype("float32")
    assert np.array_equal(_run(mod, x, fold=True), _run(mod, x, fold=False))


def _float_search(weight, abs_max, rows, x_min, x_max):
    """The W8A8 search as it was before integer candidates: fake-quantized float rows times
    the dequantized weight, in fp32 (no groups)."""
    n, k = weight.shape
    weight = weight.float()
    reference = rows @ weight.t()
    norm = float(reference.pow(2).mean()) or 1.0
    w_max = weight.abs().amax(0).clamp_min(1e-8)
    a_max = abs_max.float().clamp_min(1e-8)
    best = None
    for alpha in (0.0, 0.25, 0.5, 0.65, 0.75, 0.85):
        smooth = (a_max.pow(alpha) / w_max.pow(1 - alpha)) if alpha else torch.ones_like(a_max)
        smooth = smooth.clamp(1e-4, 1e4)
        codes, w_scale = quantize_int8(weight * smooth)
        dequant = codes.float() * w_scale[:, None]
        scaled = rows / smooth
        low, high = float((x_min / smooth).min()), float((x_max / smooth).max())
        for scale, zero, q in _ranges(scaled, low, high):
            fake = (torch.clamp(torch.round(scaled / scale) + zero, -128, 127) - zero) * scale
            err = float((fake @ dequant.t() - reference).pow(2).mean()) / norm
            if best is None or err < best[0]:
                best = (err, alpha, q, zero, codes)
    return best


@pytest.mark.parametrize("gelu", [False, True])
def test_integer_candidate_scores_choose_what_float_scores_chose(gelu):
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(512, 96, generator=g)
    rows[:, :2] *= 30  # outlier channels: SmoothQuant and clipping matter
    if gelu:
        rows = torch.nn.functional.gelu(rows)  # asymmetric: nonzero zero points
    weight = torch.randn(40, 96, generator=g) * 0.05
    args = (weight, rows.abs().amax(0), rows, rows.amin(0), rows.amax(0))
    err, alpha, clip, zero, codes = _float_search(*args)
    chosen = static_int8(*args)
    assert (chosen.alpha, chosen.clip, chosen.zero_point) == (alpha, clip, zero)
    assert torch.equal(chosen.weight, codes)
    assert chosen.error == pytest.approx(err, rel=1e-4)


def test_jobs_sizes_torch_threads_and_restores_them():
    before = torch.get_num_threads()
    with compile_jobs(1) as jobs:
        assert jobs == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    assert resolve_jobs(None) >= 1
    for bad in (0, -2, 1.5):
        with pytest.raises(UsageError, match="--jobs"):
            resolve_jobs(bad)


def test_compile_with_one_job_gives_the_same_w8a8_artifact(cli, hf_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 40)
    outputs = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"j{jobs}"
        result = cli("compile", hf_dir("bert"), "-j", jobs, "--no-cache", "--pipeline",
                     "quantize{weights=int8,activations=int8}", "--calib", str(text),
                     "-o", str(out))
        assert result.code == 0, result.err
        manifest = slimc.load(out).manifest
        assert manifest["verification"]["passed"]
        outputs[jobs] = manifest["pipeline"][0]["summary"]["per_layer"]
    # The per-layer searches run one per worker with single-threaded ops: same choices.
    assert outputs["1"] == outputs["2"]
    assert cli("compile", hf_dir("bert"), "-j", "0", "-o", str(tmp_path / "bad")).code == 2
