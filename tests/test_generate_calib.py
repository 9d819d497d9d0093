"""``--calib`` with ``--generate``: GPTQ/AWQ statistics from real text for both entry points."""

from __future__ import annotations

import json

import torch
import transformers as T

import slimc
from slimc.compiler import CompileOptions, compile_model
from tests.test_generate import GEN, _save, _word_tokenizer


def test_gptq_with_calibration_text_generates(tmp_path):
    model_dir = _save("llama", tmp_path / "model")
    _word_tokenizer(model_dir)
    words = torch.randint(4, 128, (400,), generator=torch.Generator().manual_seed(1))
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{i}" for i in words.tolist()))
    out = compile_model(model_dir, CompileOptions(
        generate=True, pipeline="quantize{weights=int4,group_size=16,method=gptq}",
        calib=str(calib), calib_batches=3, output=tmp_path / "out", threads=2, **GEN)).output
    manifest = json.loads((out / "manifest.json").read_text())
    shapes = manifest["calibration"]["batch_shapes"]
    assert manifest["calibration"]["batches"] == 3
    assert shapes["prompt_ids"] == [1, GEN["prefill_length"]] and shapes["token"] == [1, 1]
    layers = manifest["pipeline"][0]["summary"]["per_layer"]
    linear = {k: v["method"] for k, v in layers.items() if "embed" not in k and "head" not in k}
    # Every projection gets GPTQ, k/v included (they share q's input in both halves).
    assert len(linear) == 2 * 7, linear
    assert all(m == "gptq" for m in linear.values()), linear
    assert manifest["verification"]["passed"]
    result = slimc.load(out).generate([5, 9, 17, 33], 6, stop=False)
    assert len(result.tokens) == 6


def test_calibration_decode_half_sees_the_windows_cache(tmp_path):
    """The decode half of a calibration batch continues its prefill window: its logits equal
    the model's logits for the window's last token given the window before it."""
    from slimc.generation.prepare import generation_calibration, prepare_generation
    from slimc.loaders.base import LoadedModel

    model_dir = _save("llama", tmp_path / "model")
    _word_tokenizer(model_dir)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{(7 * i) % 120 + 4}" for i in range(100)))
    model = T.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    loaded = LoadedModel(name="llama", module=model, example_inputs={}, kind="huggingface",
                         source=model_dir)
    wrapped, _ = prepare_generation(loaded, GEN["max_length"], GEN["prefill_length"])
    data = generation_calibration(calib, wrapped.example_inputs, step=wrapped.module.step,
                                  model_dir=model_dir, max_batches=2)
    batch = data.batches[0]
    assert list(batch) == list(wrapped.example_inputs)
    with torch.no_grad():
        logits = wrapped.module(*batch.values())[1 + 2 * 2]
        window = torch.cat([batch["prompt_ids"], batch["token"]], dim=1)
        expected = model(window).logits[0, -1]
    torch.testing.assert_close(logits.reshape(-1), expected, rtol=1e-4, atol=1e-4)
