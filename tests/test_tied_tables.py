"""A tied embedding table is stored once, and its output head can take int8 activations.

The gather and the output head read one packed table (``backends/tvm/tied_tables.py``): before,
the head's tiles were a second copy (SmolLM2 int8: a 164 MB library for 135 MB of weights).
Under ``activations=int8`` the head itself is W8A8, multiplying int8 codes of the final hidden
states with the table's own per-row codes (SmolLM2's head was a third of its W8A8 prefill).
Real HF Llama class, tiny config with a wide vocabulary so the table dominates the library and
a width of 70 (the int8 dot kernels zero-pad K to 72, int4-g32 to whole groups of 96, so the
gathers read padded layouts); real TVM builds, verified against the IR (aarch64: under qemu).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from slimc.compiler import CompileOptions, compile_model

VOCAB, HIDDEN = 32768, 70
TABLE = "model.embed_tokens"


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=1, num_key_value_heads=1, vocab_size=VOCAB,
                           max_position_embeddings=64, tie_word_embeddings=True)
    config.architectures = ["LlamaForCausalLM"]
    path = tmp_path_factory.mktemp("tied") / "model"
    T.LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


def _compile(model, tmp_path, pipeline: str, **options) -> dict:
    out = compile_model(str(model), CompileOptions(
        pipeline=pipeline, output=tmp_path / "out.slimc", threads=2, cache=False,
        inputs=["input_ids=1x16:int64"], **options)).output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["passed"] is True
    return manifest


@pytest.mark.parametrize("pipeline, table_bytes, padding", [
    ("quantize{weights=int8}", VOCAB * HIDDEN, 0),
    # the head's int4 kernel reads whole groups: 35 code bytes a row are stored as 48
    ("quantize{weights=int4,group_size=32}", VOCAB * HIDDEN // 2, VOCAB * (96 - HIDDEN) // 2),
    ("quantize{weights=int8,activations=int8}", VOCAB * HIDDEN, VOCAB * 2),  # K 70 -> 72
])
def test_tied_table_is_stored_once(tied_model, tmp_path, pipeline, table_bytes, padding):
    manifest = _compile(tied_model, tmp_path, pipeline)
    weights, library = manifest["weight_bytes_after"], manifest["library_bytes"]
    assert table_bytes > 0.6 * weights  # the table is most of the model
    # one (padded) table plus kernel code and the ELF's tables, well under half the table
    # (measured: the int8 library was weights + 1.00x table + code before, weights + code
    # after)
    assert library < weights + padding + 0.5 * table_bytes, (library, weights, table_bytes)


def test_w8a8_gives_the_tied_head_int8_activations(tied_model, tmp_path):
    manifest = _compile(tied_model, tmp_path, "quantize{weights=int8,activations=int8}",
                        calib_batches=2)
    quantize = next(p for p in manifest["pipeline"] if p["pass"] == "quantize")
    head = quantize["summary"]["per_layer"][TABLE]
    assert head["activations"] == "int8"
    assert head["smooth_alpha"] == 0.0  # the gathers read the same codes: no migration
    assert head["calib_error"] < 0.01


@pytest.mark.parametrize("target", ["arm-v8.2", "arm"])
def test_tied_w8a8_head_on_aarch64(tied_model, tmp_path, aarch64_emulator, target):
    """The gathers read the sdot kernel's packing (arm-v8.2) and the generic int8 kernel's
    tiles (arm: no dot product); run and compared under qemu."""
    manifest = _compile(tied_model, tmp_path, "quantize{weights=int8,activations=int8}",
                        calib_batches=2, target=target, emulate="require")
    assert manifest["verification"]["ran_on"].startswith("qemu")
    assert manifest["library_bytes"] < manifest["weight_bytes_after"] + 0.5 * VOCAB * HIDDEN


def test_search_prices_the_tied_w8a8_head_as_built(tied_model):
    """The search's W8A8 price of every layer, the tied head at the int8 rate, equals the cost
    analysis of the built W8A8 IR (whose head is now ``linear_w8a8``): a latency budget the
    search expects to meet is met once built."""
    from slimc.passes.analysis.cost import int8_peak
    from slimc.passes.analysis.hardware import hardware_for_target

    from slimc.capture import capture
    from slimc.loaders.base import LoadedModel
    from slimc.search.search import Search, proxy_scorer
    from slimc.search.space import Techniques, option_costs
    from tests.test_budget import _search_context

    model = T.LlamaForCausalLM.from_pretrained(tied_model).eval()
    model.config.use_cache = False  # logits only: no cache object in the output
    g = torch.Generator().manual_seed(1)

    def tokens() -> dict[str, torch.Tensor]:
        return {"input_ids": torch.randint(0, VOCAB, (1, 64), generator=g)}

    ir, example = capture(LoadedModel(name="tied", module=model, example_inputs=tokens()))
    calib = [[b[n] for n in ir.input_names] for b in (tokens(), tokens())]
    registry, ctx = _search_context(ir, example, calib, "x86-64-v4-vnni")
    hw = hardware_for_target(ctx.target)
    search = Search(ir, ctx, registry, Techniques.for_context("precision", ctx),
                    proxy_scorer(ir, ctx), hw)
    base = search.base(0.0)
    table = next(c for c in base.space.layers if c.layer.is_embedding)
    int8 = next(j for j, o in enumerate(table.options) if o.rank is None
                and o.fmt.kind == "int8")
    peak = int8_peak(hw, "vnni")
    w8a8, weight_only = (option_costs(table, table.options[int8], hw, p)["latency"]
                         for p in (peak, None))
    assert w8a8 < 0.6 * weight_only  # the head's multiply-adds at the int8 rate
    picks = [next(j for j, o in enumerate(c.options) if o.rank is None
                  and o.fmt.kind == "int8") for c in base.space.layers]
    predicted = base.space.rest["latency"] + sum(
        option_costs(c, c.options[j], hw, peak)["latency"]
        for c, j in zip(base.space.layers, picks, strict=True))
    cand = search.w8a8_candidate(base, {}, keep=False)
    built = cand.relative["latency"] * search.original["latency"]
    assert built == pytest.approx(predicted, rel=0.02)
    assert cand.choices.get("int8+a8 (W8A8)") == len(base.space.layers)
