"""Task-level quality (``--eval-data``, ``--eval``, ``--max-drop``): perplexity, Spearman,
image accuracy and a user's metric, each on the original model and on the built artifact."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from slimc.api import CompileOptions, compile_model
from tests.models import build_hf

WORDS = ["[PAD]", "[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "big", "red",
         "car", "house", "tree", "blue", "sky", "happy", "sad", "fast"]


def _save_with_tokenizer(arch: str, path) -> str:
    """A tiny random HF model with a word-level tokenizer that adds no special tokens."""
    build_hf(arch).save_pretrained(path)
    _save_tokenizer_only(path)
    return str(path)


def _compile(model, tmp_path, **kw):
    options = CompileOptions(output=tmp_path / "out.slimc", cache=False, **kw)
    return compile_model(model, options)


def test_perplexity_on_a_tiny_llama_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = _save_with_tokenizer("llama", tmp_path / "llama")
    rng = np.random.default_rng(0)
    text = tmp_path / "held_out.txt"
    text.write_text(" ".join(rng.choice(WORDS[2:], 200)))
    result = _compile(model_dir, tmp_path, inputs=("input_ids=2x16:int64",
                                                    "attention_mask=2x16:int64"),
                      eval_data=text, eval_batches=3)
    q = result.manifest["quality"]
    assert q["metric"] == "perplexity" and not q["higher_is_better"]
    assert "built library" in q["compared"] and q["examples"] == 6 * 15
    # Independently: transformers' own loss on the same 16-token windows.
    ids = AutoTokenizer.from_pretrained(model_dir)(text.read_text(), add_special_tokens=False)
    rows = torch.tensor(ids["input_ids"][:6 * 16]).reshape(6, 16)
    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = math.exp(float(lm(rows, labels=rows).loss))
    assert q["original"] == pytest.approx(expected, rel=1e-4)
    assert q["artifact"] == pytest.approx(expected, rel=1e-3)  # -O0: the same function
    report = (result.output / "report.md").read_text()
    assert "## Task quality" in report and "(original fp32)" in report


def test_spearman_on_a_tiny_bert_and_quantized_params_still_count(tmp_path):
    from scipy.stats import spearmanr
    from transformers import AutoModel, AutoTokenizer

    model_dir = _save_with_tokenizer("bert", tmp_path / "bert")
    rng = np.random.default_rng(1)
    pairs = tmp_path / "pairs.tsv"
    rows = [(" ".join(rng.choice(WORDS[2:], 3)), " ".join(rng.choice(WORDS[2:], 2)),
             float(rng.uniform(0, 10))) for _ in range(12)]
    pairs.write_text("word1\tword2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows))
    result = _compile(model_dir, tmp_path, inputs=("input_ids=4x8:int64",
                                                    "attention_mask=4x8:int64"),
                      eval_data=pairs, pipeline="quantize{weights=int8}")
    m = result.manifest
    q = m["quality"]
    assert q["metric"] == "spearman" and q["examples"] == 12
    tok, bert = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir)

    def embed(text):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            return bert(**enc).last_hidden_state[0].mean(0).numpy()

    cos = [float(embed(a) @ embed(b) / np.linalg.norm(embed(a)) / np.linalg.norm(embed(b)))
           for a, b, _ in rows]
    assert q["original"] == pytest.approx(spearmanr([s for *_, s in rows], cos).statistic,
                                          abs=1e-6)
    assert -1.0 <= q["artifact"] <= 1.0
    assert q["drop"] == pytest.approx((q["original"] - q["artifact"]) / abs(q["original"]))
    # int8 weights are still parameters (the count must not collapse to the unquantized rest).
    assert m["params_after"] >= 0.99 * m["params_before"]
    # An embedding model's hidden states have no classes: no argmax "agreement" for them.
    assert "top1_agreement" not in m["fidelity"] and "cosine" in m["fidelity"]


def test_image_folder_accuracy_on_a_small_cnn(tmp_path):
    from PIL import Image

    from slimc.calibration import read_image
    from tests.models import small_cnn

    folder = tmp_path / "images"
    rng = np.random.default_rng(2)
    files = []
    for label in ("1", "4", "7"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            f = folder / label / f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(f)
            files.append((f, int(label)))
    result = _compile("tests.models:small_cnn", tmp_path, eval_data=folder, eval_kind="accuracy")
    q = result.manifest["quality"]
    assert q["metric"] == "top1_accuracy" and q["examples"] == 9
    net, _ = small_cnn()
    with torch.no_grad():
        scores = net(torch.stack([read_image(f, 3, 16, 16) for f, _ in files])).numpy()
    truth = np.array([label for _, label in files])
    ranked = np.argsort(-scores, 1)
    assert q["original"] == pytest.approx(float(np.mean(ranked[:, 0] == truth)))
    assert q["all"]["original"]["top5_accuracy"] == pytest.approx(
        float(np.mean((ranked[:, :5] == truth[:, None]).any(1))))
    assert "top1_agreement" in result.manifest["fidelity"]  # class scores: argmax means something


METRIC = '''
import numpy as np

def agreement(model, data):
    """Cosine between the model's output and a reference stored in `data` (a .npy)."""
    reference = np.load(data)
    out = model(**{name: value for name, value in model.example_inputs.items()})[0]
    return float((out * reference).sum() / np.linalg.norm(out) / np.linalg.norm(reference))
'''


def _user_metric(tmp_path):
    from tests.models import small_cnn

    (tmp_path / "my_metric.py").write_text(METRIC)
    net, (x,) = small_cnn()
    with torch.no_grad():
        np.save(tmp_path / "reference.npy", net(x).numpy())
    return f"{tmp_path / 'my_metric.py'}:agreement", tmp_path / "reference.npy"


def test_user_metric_module_function(tmp_path):
    spec, data = _user_metric(tmp_path)
    result = _compile("tests.models:small_cnn", tmp_path, eval_kind=spec, eval_data=data)
    q = result.manifest["quality"]
    assert q["metric"] == "agreement" and q["original"] == pytest.approx(1.0, abs=1e-6)
    assert q["artifact"] == pytest.approx(1.0, abs=1e-4)
    manifest = json.loads((result.output / "manifest.json").read_text())
    assert manifest["quality"]["metric"] == "agreement"


def test_max_drop_fails_with_exit_2_and_writes_nothing(tmp_path, cli):
    spec, data = _user_metric(tmp_path)
    out = tmp_path / "never.slimc"
    res = cli("compile", "tests.models:small_cnn", "--pipeline", "quantize{weights=int4}",
              "--eval", spec, "--eval-data", data, "--max-drop", "0", "-o", out, "--no-cache")
    assert res.code == 2, res.err
    assert "--max-drop" in res.err and "(original fp32)" in res.err
    assert not out.exists()
    res = cli("compile", "tests.models:small_cnn", "--pipeline", "quantize{weights=int4}",
              "--eval", spec, "--eval-data", data, "--max-drop", "0.9", "-o", out, "--no-cache")
    assert res.code == 0, res.err
    assert "agreement: 1 (original fp32) ->" in res.out and "vs the original model" in res.out
    assert json.loads((out / "manifest.json").read_text())["quality"]["drop"] > 0


def test_bad_task_options_are_usage_errors(tmp_path, cli):
    res = cli("compile", "tests.models:small_cnn", "--max-drop", "0.1", "-o", tmp_path / "a")
    assert res.code == 2 and "--eval-data" in res.err
    res = cli("compile", "tests.models:small_cnn", "--eval", "bleu", "--eval-data", tmp_path,
              "-o", tmp_path / "b", "--no-cache")
    assert res.code == 2 and "bleu" in res.err and "Traceback" not in res.err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_same_file_as_calibration_is_held_out(tmp_path):
    """Evaluation starts after the tokens calibration read from the same file."""
    from slimc.plugins import get_registry
    from slimc.task_eval import EvalContext, prepare

    model_dir = tmp_path / "tok"
    model_dir.mkdir()
    _save_tokenizer_only(model_dir)
    text = tmp_path / "both.txt"
    words = [WORDS[2 + i % 18] for i in range(400)]
    text.write_text(" ".join(words))
    template = {"input_ids": np.zeros((2, 10), np.int64)}

    def first_row(skip):
        ctx = EvalContext(["input_ids"], template, str(model_dir), max_batches=2, skip=skip)
        task = prepare(None, text, ctx, get_registry().evaluators)
        seen = []
        task.run_one(lambda arrays: seen.append(arrays[0]) or
                     [np.zeros((2, 10, len(WORDS)), np.float32)])
        return seen[0][0].tolist(), task

    ids = [WORDS.index(w) for w in words]
    assert first_row(0)[0] == ids[:10]
    row, task = first_row(3)  # calibration read 3 batches of 2 x 10 tokens
    assert row == ids[60:70] and task.name == "perplexity"


def test_perplexity_needs_a_tokenizer(tmp_path):
    from slimc.errors import UsageError
    from slimc.plugins import get_registry
    from slimc.task_eval import EvalContext, prepare

    text = tmp_path / "t.txt"
    text.write_text("the cat " * 50)
    ctx = EvalContext(["input_ids"], {"input_ids": np.zeros((1, 8), np.int64)}, None, 2)
    with pytest.raises(UsageError, match="no tokenizer"):
        prepare("perplexity", text, ctx, get_registry().evaluators)


def _save_tokenizer_only(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                            pad_token="[PAD]").save_pretrained(path)


def test_accuracy_on_a_text_model_names_the_metrics_that_fit(tmp_path, cli, hf_dir):
    """``--eval accuracy --eval-data notes.txt`` on a language model: the error said the *text
    file* "holds images"; it says accuracy needs images and which metrics suit this model."""
    text = tmp_path / "notes.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 40)
    out = tmp_path / "never.slimc"
    res = cli("compile", hf_dir("llama"), "--input", "input_ids=1x16:int64", "-O2", "--eval",
              "accuracy", "--eval-data", text, "-o", out, "--no-cache")
    assert res.code == 2, res.err
    assert "holds images" not in res.err and "labelled image folder" in res.err
    assert "perplexity" in res.err and "Traceback" not in res.err
    assert not out.exists()


def test_named_metric_given_the_wrong_kind_of_data_says_what_it_reads(tmp_path, cli):
    """An image classifier with ``--eval accuracy --eval-data notes.txt`` said "cannot read the
    folder notes.txt (Not a directory)", and a folder for perplexity failed in its reader: the
    error now names the metric, what it reads and what was given, before any compile."""
    text = tmp_path / "notes.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 40)
    out = tmp_path / "never.slimc"
    res = cli("compile", "tests.models:small_cnn", "--eval", "accuracy", "--eval-data", text,
              "-o", out, "--no-cache")
    assert res.code == 2, res.err
    assert "labelled image folder" in res.err and "is a file" in res.err
    assert "Not a directory" not in res.err and "Traceback" not in res.err
    res = cli("compile", "tests.models:small_cnn", "--eval", "perplexity", "--eval-data",
              tmp_path, "-o", out, "--no-cache")
    assert res.code == 2, res.err
    assert "perplexity" in res.err and "is a folder" in res.err and "Traceback" not in res.err
    assert not out.exists()
