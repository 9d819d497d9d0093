"""The artifact directory, the manifest, `slimc run`, `slimc.load`, the .pt2 and recipe forms."""

from __future__ import annotations

import json

import numpy as np
import torch

import slimc
from tests.models import small_cnn

REQUIRED_MANIFEST_KEYS = {
    "slimc_version", "target", "inputs", "outputs", "pipeline", "params_before", "params_after",
    "weight_bytes_before", "weight_bytes_after", "fidelity", "library", "sha256",
}


def test_manifest_report_and_run(cli, tmp_path):
    out = tmp_path / "cnn.slimc"
    result = cli("compile", "tests.models:small_cnn", "-o", out, "-q", "--threads", "2",
                 "--pipeline", "eliminate-dead-code", "--save-ir")
    assert result.code == 0, result.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert REQUIRED_MANIFEST_KEYS <= set(manifest)
    assert manifest["inputs"] == [{"name": "image", "shape": [2, 3, 16, 16], "dtype": "float32"}]
    assert manifest["pipeline"][0]["pass"] == "eliminate-dead-code"
    assert manifest["threads"] == 2
    assert manifest["fidelity"]["relative_l2"] < 1e-5
    assert manifest["fidelity"]["measured_on"] == "artifact"
    report = (out / "report.md").read_text()
    assert "eliminate-dead-code" in report and "matched the IR" in report
    assert slimc.IR.load(out / "ir.pt2").input_names == ["image"]

    net, (image,) = small_cnn()
    np.save(tmp_path / "image.npy", image.numpy())
    run = cli("run", out, "--input", f"image={tmp_path / 'image.npy'}", "-o", tmp_path / "res",
              "--json")
    assert run.code == 0, run.err
    logits = np.load(tmp_path / "res" / "output0.npy")
    np.testing.assert_allclose(logits, net(image).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_pt2_input_form(tmp_path, cli):
    net, (image,) = small_cnn()
    path = tmp_path / "cnn.pt2"
    torch.export.save(torch.export.export(net, (image,)), path)
    result = cli("compile", path, "-o", tmp_path / "from-pt2", "--json", "-q")
    assert result.code == 0, result.err
    compiled = slimc.load(tmp_path / "from-pt2")
    (logits,) = compiled(image.numpy()).values()
    np.testing.assert_allclose(logits, net(image).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_recipe_file_drives_the_pipeline(tmp_path, cli):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("pipeline:\n  - model-stats\n  - pass: eliminate-dead-code\n")
    result = cli("compile", "tests.models:small_cnn", "--recipe", recipe, "-o",
                 tmp_path / "r", "--json", "-q")
    assert result.code == 0, result.err
    passes = [p["pass"] for p in json.loads(result.out)["pipeline"]]
    assert passes == ["model-stats", "eliminate-dead-code"]


def test_passes_and_targets_listing(cli):
    listing = json.loads(cli("passes", "--json").out)
    names = {p["name"]: p for p in listing["passes"]}
    assert names["eliminate-dead-code"]["plugin"] == "slimc.passes.builtin"
    assert names["legalize-for-tvm"]["plugin"] == "slimc.backends.builtin"
    targets = json.loads(cli("targets", "--json").out)["targets"]
    arm = next(t for t in targets if t["name"] == "arm")
    assert "aarch64" in arm["aliases"] and arm["triple"] == "aarch64-linux-gnu"


def test_tvm_tag_target_resolves():
    from slimc.targets import resolve_target

    spec = resolve_target("raspberry-pi/4b-aarch64")
    assert spec.triple == "aarch64-linux-gnu" and spec.is_cross
    assert resolve_target("AArch64").name == "arm"
    assert not resolve_target("x86").is_cross


def test_calibration_data_reaches_the_passes(cli, hf_dir, tmp_path):
    ids = np.random.default_rng(0).integers(0, 128, size=(6, 16), dtype=np.int64)
    np.savez(tmp_path / "calib.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    result = cli("compile", hf_dir("llama"), "-o", tmp_path / "q", "-q", "--json",
                 "-i", "input_ids=2x16:int64", "-i", "attention_mask=2x16:int64",
                 "--pipeline", "quantize{weights=int8,method=gptq}",
                 "--calib", tmp_path / "calib.npz", "--calib-batches", "2")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["calibration"]["batches"] == 2
    assert manifest["calibration"]["batch_shapes"]["input_ids"] == [2, 16]
    assert manifest["weight_bytes_after"] < manifest["weight_bytes_before"] / 2
    assert manifest["verification"]["passed"] is True

    missing = cli("compile", hf_dir("llama"), "--calib", tmp_path / "nope.txt")
    assert missing.code == 2 and "does not exist" in missing.err
