"""The real pretrained all-MiniLM-L6-v2: compiled, run on tokenized text, compared with PyTorch."""

from __future__ import annotations

import json

import numpy as np
import torch
import transformers

import slimc


def test_minilm_text_in_embeddings_out_match_pytorch(minilm_dir, tmp_path, cli):
    out = tmp_path / "minilm"
    result = cli("compile", minilm_dir, "-o", out, "-q", "--json",
                 "--input", "input_ids=2x24:int64", "--input", "attention_mask=2x24:int64")
    assert result.code == 0, result.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params_after"] == 22_713_216
    assert manifest["tokenizer"] == "tokenizer"

    texts = ["A man is playing a guitar.", "Someone plays an instrument on stage."]
    compiled = slimc.load(out)
    feed = compiled.tokenize(texts)
    hidden = compiled(**feed)["last_hidden_state"]

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    model = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    enc = tokenizer(texts, padding="max_length", max_length=24, return_tensors="pt")
    with torch.no_grad():
        want = model(**enc).last_hidden_state.numpy()
    np.testing.assert_array_equal(feed["input_ids"], enc["input_ids"].numpy())
    np.testing.assert_allclose(hidden, want, rtol=1e-4, atol=1e-4)

    # Mean-pooled sentence embeddings of related sentences stay close (a real model, not noise).
    mask = feed["attention_mask"][..., None]
    emb = (hidden * mask).sum(1) / mask.sum(1)
    cosine = emb[0] @ emb[1] / np.linalg.norm(emb[0]) / np.linalg.norm(emb[1])
    assert cosine > 0.4

    run = cli("run", out, "--text", texts[0], "--json")
    assert run.code == 0, run.err
    assert json.loads(run.out)["outputs"]["last_hidden_state"]["shape"] == [2, 24, 384]
