"""Encoders as users call them: tokenizer output, text and batches into ``slimc.load(OUT)``,
and sentence-transformers pooling compiled into the artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as T

import slimc
from slimc.errors import UsageError
from tests.models import TEXT

WORDS = ["the", "a", "man", "woman", "plays", "guitar", "piano", "on", "stage", "dog", "runs",
         "park", "in", "quickly", "music", "loud", "."]


def _save_sentence_model(path, modes: list[str], normalize: bool) -> None:
    """A tiny random BERT + WordPiece tokenizer + sentence-transformers module files."""
    config = T.BertConfig(**TEXT)
    config.architectures = ["BertModel"]
    torch.manual_seed(0)
    T.BertModel(config).eval().save_pretrained(path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    T.BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir()
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    flags = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
             "mean": "pooling_mode_mean_tokens"}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, **{flag: name in modes for name, flag in flags.items()}}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48}))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """cls+max pooling, normalized, with a dynamic sequence length; and the reference model."""
    from sentence_transformers import SentenceTransformer

    path = tmp_path_factory.mktemp("st") / "encoder"
    path.mkdir()
    _save_sentence_model(path, ["cls", "max"], normalize=True)
    out = tmp_path_factory.mktemp("st-out") / "out"
    slimc.compile_model(str(path), slimc.CompileOptions(
        inputs=["input_ids=1x1..64:int64"], output=out))
    return slimc.load(out), SentenceTransformer(str(path), device="cpu"), str(path)


TEXTS = ["the man plays the guitar on stage .", "a dog runs", "music"]


def test_pooling_and_normalisation_are_compiled_in(encoder):
    compiled, reference, _ = encoder
    assert [o["name"] for o in compiled.outputs] == ["sentence_embedding", "last_hidden_state"]
    assert compiled.manifest["model"]["pooling"] == "cls+max, normalized"
    want = reference.encode(TEXTS, convert_to_numpy=True)
    got = compiled.encode(TEXTS)  # batch 1 artifact: three texts run as chunks
    assert got.shape == want.shape == (3, 64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_tokenizer_output_text_and_batches_are_accepted(encoder):
    compiled, reference, path = encoder
    tokenizer = T.AutoTokenizer.from_pretrained(path)
    want = reference.encode(TEXTS[:1], convert_to_numpy=True)[0]
    calls = {
        "BatchEncoding (torch)": lambda: compiled(**tokenizer(TEXTS[0], return_tensors="pt")),
        "mapping (numpy)": lambda: compiled(dict(tokenizer(TEXTS[0], return_tensors="np"))),
        "lists, int32": lambda: compiled(**{k: np.asarray(v, np.int32) for k, v in
                                            tokenizer(TEXTS[0]).items()}),
        "text": lambda: compiled(TEXTS[0]),
        # extra tokenizer keys the model does not take are dropped; the mask is filled in
        "extra keys": lambda: compiled(input_ids=tokenizer(TEXTS[0])["input_ids"],
                                       special_tokens_mask=tokenizer(
                                           TEXTS[0], return_special_tokens_mask=True)[
                                           "special_tokens_mask"]),
    }
    for what, call in calls.items():
        got = call()["sentence_embedding"][0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=what)
    batch = compiled(TEXTS)
    assert batch["sentence_embedding"].shape == (3, 64)
    np.testing.assert_allclose(batch["sentence_embedding"],
                               reference.encode(TEXTS, convert_to_numpy=True), atol=1e-5)
    with pytest.raises(UsageError, match="Unknown input 'input_idz'"):
        compiled(input_idz=[1, 2, 3])


def test_models_without_token_types_drop_them(hf_dir, tmp_path, cli):
    # Llama's forward takes no token_type_ids: a tokenizer that returns them still works.
    out = tmp_path / "llama"
    assert cli("compile", hf_dir("llama"), "-o", out, "-q", "--input",
               "input_ids=1x8:int64").code == 0
    compiled = slimc.load(out)
    assert [i["name"] for i in compiled.inputs] == ["input_ids", "attention_mask"]
    ids = np.arange(8, dtype=np.int64)[None]
    got = compiled(input_ids=ids, token_type_ids=np.zeros_like(ids))
    want = compiled(input_ids=ids, attention_mask=np.ones_like(ids))
    np.testing.assert_array_equal(got["logits"], want["logits"])


def test_real_minilm_pooled_embedding_matches_sentence_transformers(minilm_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "minilm"
    slimc.compile_model(minilm_dir, slimc.CompileOptions(
        inputs=["input_ids=1x1..256:int64"], output=out))
    compiled = slimc.load(out)
    texts = ["A man is playing a guitar.", "Someone plays an instrument on stage.",
             "The quarterly report is due on Friday, and the numbers look worse than expected."]
    want = SentenceTransformer(minilm_dir, device="cpu").encode(texts, convert_to_numpy=True)
    got = compiled.encode(texts)
    cosine_distance = 1 - (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(
        want, axis=1)
    assert cosine_distance.max() < 1e-5
    assert got[0] @ got[1] > got[0] @ got[2]  # a real model: related sentences are closer
