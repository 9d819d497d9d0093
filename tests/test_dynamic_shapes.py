"""Dynamic dimensions: ``--input input_ids=1x1..N`` captured with torch.export Dims, lowered
as TVM Relax symbolic shapes, verified at several sizes and checked against the bounds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import slimc
from slimc.errors import UsageError
from slimc.loaders.base import InputOverride

MAX_LEN = 256  # conftest's bert256 position table




def _compile(path, out, *inputs, pipeline=None):
    options = slimc.CompileOptions(inputs=list(inputs), output=out, pipeline=pipeline)
    return slimc.compile_model(path, options)


def _relative(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def dynamic_bert(bert256, tmp_path_factory):
    path, _ = bert256
    return _compile(path, tmp_path_factory.mktemp("dyn") / "out", f"input_ids=1x1..{MAX_LEN}:int64")


def test_dynamic_artifact_matches_pytorch_at_every_length(bert256, dynamic_bert):
    _, model = bert256
    manifest = dynamic_bert.manifest
    seq = {"name": "seq", "min": 1, "max": MAX_LEN}
    # The mask and token types follow the ids' dynamic length (one symbol, agreed).
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask",
                                                       "token_type_ids"]
    assert all(i["dims"] == [1, seq] for i in manifest["inputs"])
    assert manifest["outputs"][0]["dims"] == [1, seq, 32]
    # Verified at the example length, 1, 37 and the longest length within 8x the example's
    # cost (here the maximum: nothing is left out).
    checked = {s["sizes"]["seq"] for s in manifest["verification"]["shapes"]}
    assert checked == {1, 37, MAX_LEN}
    assert all(s["passed"] for s in manifest["verification"]["shapes"])
    assert manifest["verification"]["not_checked"] is None

    compiled = slimc.load(dynamic_bert.output)
    generator = torch.Generator().manual_seed(1)
    for length in (1, 7, 128, MAX_LEN):
        ids = torch.randint(0, 128, (1, length), generator=generator)
        mask = torch.ones(1, length, dtype=torch.int64)
        mask[0, length * 3 // 4 + 1:] = 0  # padding at the end
        types = torch.zeros_like(ids)
        types[0, length // 2:] = 1  # a second segment: token types are used, not dropped
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        got = compiled(input_ids=ids, attention_mask=mask, token_type_ids=types)
        np.testing.assert_allclose(got["last_hidden_state"], want.last_hidden_state.numpy(),
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["pooler_output"], want.pooler_output.numpy(),
                                   rtol=1e-4, atol=1e-4)


def test_inputs_outside_the_bounds_are_a_clean_error(dynamic_bert, cli, tmp_path):
    compiled = slimc.load(dynamic_bert.output)
    with pytest.raises(UsageError, match=r"seq = 257 .*1\.\.256"):
        compiled(input_ids=np.zeros((1, MAX_LEN + 1), np.int64))
    with pytest.raises(UsageError, match="must agree on seq"):
        compiled(input_ids=np.zeros((1, 5), np.int64), attention_mask=np.ones((1, 6), np.int64))
    with pytest.raises(UsageError, match="dim 0 fixed at 1"):
        compiled(input_ids=np.zeros((2, 5), np.int64))
    np.save(tmp_path / "long.npy", np.zeros((1, 300), np.int64))
    result = cli("run", dynamic_bert.output, "--input", f"input_ids={tmp_path / 'long.npy'}",
                 "--input", f"attention_mask={tmp_path / 'long.npy'}")
    assert result.code == 2 and "Traceback" not in result.err and "1..256" in result.err


def test_dynamic_batch_and_quantized_weights(bert256, tmp_path):
    path, model = bert256
    result = _compile(path, tmp_path / "q", "input_ids=1..4x1..64:int64",
                      pipeline="quantize{weights=int8}")
    dims = result.manifest["inputs"][0]["dims"]
    assert dims == [{"name": "batch", "min": 1, "max": 4}, {"name": "seq", "min": 1, "max": 64}]
    compiled = slimc.load(result.output)
    for batch, length in ((1, 1), (3, 7), (4, 64)):
        ids = torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            want = model(input_ids=ids).last_hidden_state.numpy()
        got = compiled(input_ids=ids)["last_hidden_state"]
        assert got.shape == want.shape
        assert _relative(got, want) < 0.05  # int8 weights: close, not equal


def test_overriding_one_sequence_input_reshapes_the_others(hf_dir, cli, tmp_path):
    out = tmp_path / "b16"
    result = cli("compile", hf_dir("bert"), "-o", out, "-q", "--input", "input_ids=2x16:int64")
    assert result.code == 0, result.err
    inputs = json.loads((out / "manifest.json").read_text())["inputs"]
    assert {i["name"]: i["shape"] for i in inputs} == {
        "input_ids": [2, 16], "attention_mask": [2, 16], "token_type_ids": [2, 16]}


@pytest.mark.parametrize("args, fragment", [
    (["--input", "input_ids=1x16:int64", "--input", "attention_mask=1x8:int64"], "disagree"),
    (["--input", "input_ids=1x9..4:int64"], "LO <= HI"),
    (["--input", "input_ids=1x1..65:int64"], "longer than the model's 64 positions"),
])
def test_inconsistent_or_malformed_dims_exit_2(hf_dir, cli, tmp_path, args, fragment):
    result = cli("compile", hf_dir("bert"), "-o", tmp_path / "x", *args)
    assert result.code == 2 and "Traceback" not in result.err
    assert fragment in result.err


def test_range_syntax_parses_bounds_and_example_sizes():
    ov = InputOverride.parse("input_ids=1..8x1..512:int64")
    assert ov.shape == (2, 128)  # examples: never 0/1 (torch specialises those)
    assert [(r.name, r.min, r.max) for r in ov.ranges] == [("batch", 1, 8), ("seq", 1, 512)]
    fixed = InputOverride.parse("input_ids=1x64:int64")
    assert fixed.shape == (1, 64) and fixed.ranges is None
    assert InputOverride.parse("x=1x4..4").ranges is None  # LO == HI is a fixed dim


def _symbolic_matmul(kind: str):
    from tvm import te, tirx

    m = tirx.Var("m", "int64")
    if kind == "dense":
        x = te.placeholder((m, 16), "float32", name="x")
        w = te.placeholder((16, 48), "float32", name="w")
        r = te.reduce_axis((0, 16), name="k")
        y = te.compute((m, 48), lambda i, j: te.sum(x[i, r] * w[r, j], axis=r), name="y")
        return te.create_prim_func([x, w, y], index_dtype_override="int64")
    q = te.placeholder((2, m, 8), "float32", name="q")
    k = te.placeholder((2, 8, m), "float32", name="k")
    r = te.reduce_axis((0, 8), name="d")
    y = te.compute((2, m, m), lambda h, i, j: te.sum(q[h, i, r] * k[h, r, j], axis=r), name="y")
    return te.create_prim_func([q, k, y], index_dtype_override="int64")


@pytest.mark.parametrize("kind", ["dense", "attention"])
def test_matmul_rule_pads_symbolic_tiles_and_stays_exact(kind):
    """A symbolic rows/columns axis is padded to whole tiles (no predicate in the kernel)."""
    import tvm
    from slimc.backends.tvm.schedules.cpu_matmul import TiledMatmul

    from slimc.targets import resolve_target

    target = resolve_target("llvm").tvm_target()
    scheduled = TiledMatmul().apply(_symbolic_matmul(kind), target).mod["main"]
    assert "_pad" in scheduled.script()  # zero-padded operand copies, unpredicated kernel
    lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}),
                      target=target)
    rng = np.random.default_rng(0)
    for m in (1, 7, 37):
        if kind == "dense":
            a, b = rng.standard_normal((m, 16)), rng.standard_normal((16, 48))
            want = a @ b
        else:
            a, b = rng.standard_normal((2, m, 8)), rng.standard_normal((2, 8, m))
            want = np.einsum("hik,hkj->hij", a, b)
        out = tvm.runtime.tensor(np.zeros(want.shape, "float32"))
        lib["main"](tvm.runtime.tensor(a.astype("float32")),
                    tvm.runtime.tensor(b.astype("float32")), out)
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4)
