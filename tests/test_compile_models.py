"""End to end at -O0: every architecture compiles for the host, runs, and matches PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import slimc
from tests.models import FULL_CONFIG_ARCHS, HF_ARCHS


def _eager_outputs(model_dir: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    config = transformers.AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, config.architectures[0])
    model = cls.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feed.items()}, use_cache=False)
    return [v.numpy() for v in out.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("arch", sorted(HF_ARCHS) + sorted(FULL_CONFIG_ARCHS))
def test_hf_model_compiles_for_host_and_matches_pytorch(arch, hf_dir, tmp_path, cli):
    model_dir = hf_dir(arch)
    out = tmp_path / "artifact"
    result = cli("compile", model_dir, "--target", "llvm", "-o", out, "--json", "-q")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["verification"]["passed"] is True
    assert summary["params_before"] == summary["params_after"] > 0

    compiled = slimc.load(out)
    feed = compiled.example_inputs()
    got = list(compiled(**feed).values())
    want = _eager_outputs(model_dir, feed)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("factory", ["llama_no_mask", "qwen2_no_mask", "mistral_no_mask",
                                     "gemma_no_mask", "phi_no_mask", "gpt_neox_no_mask"])
def test_causal_lm_without_attention_mask_lowers(factory, tmp_path):
    """The bool-cumsum position-id path (TVM codegen failure before legalization) builds."""
    result = slimc.compile_model(f"tests.models:{factory}",
                                 slimc.CompileOptions(output=tmp_path / "a"))
    assert result.manifest["verification"]["passed"] is True
    assert result.manifest["inputs"][0]["name"] == "input_ids"
    assert result.manifest["outputs"][0]["name"] == "logits"


def test_cnn_factory_compiles_and_matches_pytorch(tmp_path):
    from tests.models import small_cnn

    result = slimc.compile_model("tests.models:small_cnn",
                                 slimc.CompileOptions(output=tmp_path / "cnn"))
    net, (image,) = small_cnn()
    compiled = slimc.load(result.output)
    (logits,) = compiled(image.numpy()).values()
    np.testing.assert_allclose(logits, net(image).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert result.manifest["outputs"][0]["shape"] == [2, 10]


def test_factory_with_named_inputs_and_tuple_outputs(tmp_path):
    from tests.models import two_inputs_two_outputs

    result = slimc.compile_model("tests.models:two_inputs_two_outputs",
                                 slimc.CompileOptions(output=tmp_path / "two"))
    net, feed = two_inputs_two_outputs()
    compiled = slimc.load(result.output)
    outs = compiled(b=feed["b"].numpy(), a=feed["a"].numpy())
    want = net(**feed)
    assert [i["name"] for i in result.manifest["inputs"]] == ["a", "b"]
    for got, ref in zip(outs.values(), want, strict=True):
        np.testing.assert_allclose(got, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
