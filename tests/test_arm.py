"""`--target arm`: a real aarch64 shared library, run under qemu-aarch64 with an aarch64 TVM
runtime, matches PyTorch."""

from __future__ import annotations

import json

import numpy as np
import torch
import transformers


def test_llama_gqa_for_arm_runs_under_qemu_and_matches_pytorch(aarch64_emulator, hf_dir,
                                                               tmp_path, cli):
    model_dir = hf_dir("llama")
    out = tmp_path / "llama-arm"
    result = cli("compile", model_dir, "--target=arm", "-o", out, "--json", "-q",
                 "--emulate", "require", "--input", "input_ids=1x16:int64",
                 "--input", "attention_mask=1x16:int64")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["verification"]["ran_on"] == "qemu-aarch64"
    assert summary["target"]["cross_triple"] == "aarch64-linux-gnu"
    header = (out / "model.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert int.from_bytes(header[16:18], "little") == 3  # ET_DYN: a shared library
    assert int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64

    import slimc

    compiled = slimc.load(out, emulate=True)
    feed = compiled.example_inputs()
    feed["attention_mask"][0, :4] = 0  # left padding: a different input than at compile time
    logits = compiled(**feed)["logits"]
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feed.items()},
                     use_cache=False).logits.numpy()
    np.testing.assert_allclose(logits[0, 4:], want[0, 4:], rtol=1e-4, atol=1e-4)


def test_raspberry_pi_tag_target(aarch64_emulator, tmp_path):
    import slimc

    result = slimc.compile_model("tests.models:small_cnn", slimc.CompileOptions(
        target="raspberry-pi/4b-aarch64", output=tmp_path / "rpi", emulate="require"))
    assert result.manifest["verification"]["passed"] is True
    assert "cortex-a72" in result.manifest["target"]["tvm"]
