"""Verification input chosen by cost (issue 18): a dynamic-size cross artifact is checked under
qemu on a short input (and at its smallest size), not on the full example; fixed shapes and
host builds keep the example."""

from __future__ import annotations

import slimc
from slimc.compiler import EMULATED_CHECK_SIZE


def test_dynamic_arm_artifact_is_checked_on_a_few_tokens(hf_dir, tmp_path, aarch64_emulator):
    result = slimc.compile_model(hf_dir("bert"), slimc.CompileOptions(
        target="arm", emulate="require", output=tmp_path / "out", threads=1, cache=False,
        inputs=["input_ids=1x1..48:int64"]))
    v = result.manifest["verification"]
    assert v["passed"] and v["ran_on"].startswith("qemu")
    assert list(v["sizes"].values()) == [EMULATED_CHECK_SIZE]
    assert [list(s["sizes"].values()) for s in v["shapes"]] == [[1]]
    assert all(s["passed"] for s in v["shapes"]) and "largest" in v["not_checked"]
    # the artifact still records (and takes) the example shape it was captured with
    example = {i["name"]: i["shape"] for i in result.manifest["inputs"]}["input_ids"]
    assert example[1] > EMULATED_CHECK_SIZE


def test_host_dynamic_artifact_is_checked_at_the_policy_lengths(hf_dir, tmp_path):
    result = slimc.compile_model(hf_dir("bert"), slimc.CompileOptions(
        output=tmp_path / "out", threads=1, cache=False, inputs=["input_ids=1x1..48:int64"]))
    v = result.manifest["verification"]
    assert v["passed"] and v["not_checked"] is None and "longest" in v["policy"]
    checked = {s["sizes"]["seq"] for s in v["shapes"]} | {v["sizes"]["seq"]}
    assert checked == {1, 37, 48}  # the example (48: 128 clamped into the bounds) is the max
