"""``distill{data=PATH}`` (issue 17): recovery after GPTQ trains on its own text while
``--calib`` feeds the passes before it (GPTQ's Hessians), the SmolLM2 recipe
(``quantize{method=gptq,act_order=true,layers=[...]}`` + ``distill{scales=true,...}``)
through ``slimc compile``. Real tiny HF Llama with a word-level tokenizer, real TVM build."""

from __future__ import annotations

import numpy as np

from slimc.api import CompileOptions, compile_model
from tests.test_task_eval import WORDS, _save_with_tokenizer

PIPELINE = ("quantize{weights=int4,group_size=32,zero_point=float,method=gptq,act_order=true,"
            "layers=[*.gate_proj=int3-g32,*.up_proj=int3-g32]},"
            "distill{scales=true,trainable=norms,steps=4,lr=1e-2,holdout=0.34,eval_every=2,"
            "data=DATA,data_batches=6}")


def _texts(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for name, words in [("calib", WORDS[2:10]), ("data", WORDS[10:]), ("eval", WORDS[2:])]:
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text(" ".join(rng.choice(words, 400)))
    return paths


def _step(manifest: dict, name: str) -> dict:
    return next(p for p in manifest["pipeline"] if p["pass"] == name)


def test_distill_trains_on_its_own_data_after_gptq_through_compile(tmp_path):
    model_dir = _save_with_tokenizer("llama", tmp_path / "llama")
    texts = _texts(tmp_path)
    result = compile_model(model_dir, CompileOptions(
        output=tmp_path / "out.slimc", cache=False,
        pipeline=PIPELINE.replace("DATA", str(texts["data"])),
        inputs=("input_ids=2x16:int64", "attention_mask=2x16:int64"),
        calib=texts["calib"], calib_batches=3, eval_data=texts["eval"], eval_batches=3))
    m = result.manifest
    quantize = _step(m, "quantize")["summary"]["per_layer"]
    # every linear by GPTQ (the untied embedding table is a gather only: no Hessian, rounded)
    assert {v["method"] for k, v in quantize.items() if "embed" not in k} == {"gptq"}
    assert {v["format"] for k, v in quantize.items() if k.endswith(("gate_proj", "up_proj"))} \
        == {"int3-g32"}
    assert {v["format"] for k, v in quantize.items()
            if not k.endswith(("gate_proj", "up_proj"))} == {"int4-g32-fz"}
    distill = _step(m, "distill")["summary"]
    # 6 batches read from data.txt (--calib gave 3): 4 trained on, the last 2 held out
    assert distill["data"] == str(texts["data"])
    assert (distill["train_batches"], distill["held_out_batches"]) == (4, 2)
    assert [s for s, _ in distill["held_out_curve"]] == [0, 2, 4]
    assert distill["trained_params"] > 0
    assert m["verification"]["passed"]
    quality = m["quality"]
    assert quality["metric"] == "perplexity" and quality["artifact"] > 1.0


def test_distill_data_errors_are_one_paragraph(cli, tmp_path):
    model_dir = _save_with_tokenizer("llama", tmp_path / "llama")
    texts = _texts(tmp_path)
    missing = tmp_path / "nowhere.txt"
    result = cli("compile", model_dir, "-o", tmp_path / "a", "-q", "--calib", texts["calib"],
                 "--pipeline", f"distill{{scales=true,data={missing}}}")
    assert result.code == 2 and "Traceback" not in result.err
    assert "does not exist" in result.err and "nowhere.txt" in result.err
    short = tmp_path / "short.txt"
    short.write_text("the cat sat")
    result = cli("compile", model_dir, "-o", tmp_path / "b", "-q", "--input",
                 "input_ids=2x16:int64", "--input", "attention_mask=2x16:int64", "--calib",
                 texts["calib"], "--pipeline", f"distill{{steps=2,data={short}}}")
    assert result.code == 2 and "Traceback" not in result.err
    assert "holds 1 batch" in result.err and not (tmp_path / "b").exists()
