"""Calibration data: text through the model's tokenizer, arrays, images, synthetic, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimc.calibration import load_calibration
from slimc.errors import UsageError

TEMPLATE = {"input_ids": torch.zeros(1, 12, dtype=torch.int64),
            "attention_mask": torch.ones(1, 12, dtype=torch.int64)}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a"]


def _tokenizer_dir(tmp_path):
    from transformers import BertTokenizer

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    return tmp_path


def test_text_is_tokenized_with_the_models_tokenizer(tmp_path):
    model_dir = _tokenizer_dir(tmp_path / "model")
    text = tmp_path / "calib.txt"
    text.write_text("the cat sat on the mat " * 40)
    data = load_calibration(text, TEMPLATE, model_dir=model_dir, batch_size=2, max_batches=3)
    assert not data.synthetic and len(data.batches) == 3 and not data.warnings
    ids = data.batches[0]["input_ids"]
    assert ids.shape == (2, 12) and data.batches[0]["attention_mask"].shape == (2, 12)
    assert ids[0, 0] == 2 and ids[0, -1] == 3  # [CLS] ... [SEP], as the tokenizer adds them
    assert set(ids[0, 1:-1].tolist()) <= {5, 6, 7, 8, 9}


def test_text_without_tokenizer_warns(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("hello world, " * 30)
    data = load_calibration(text, TEMPLATE, model_dir=tmp_path, vocab_size=50)
    assert data.warnings and int(data.batches[0]["input_ids"].max()) < 50


def test_npy_npz_and_images(tmp_path):
    images = {"image": torch.zeros(2, 3, 8, 8)}
    array = np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", array)
    data = load_calibration(tmp_path / "x.npy", images, max_batches=5)
    assert len(data.batches) == 3
    np.testing.assert_array_equal(data.batches[1]["image"].numpy(), array[2:4])
    np.savez(tmp_path / "x.npz", image=array[:2])
    assert len(load_calibration(tmp_path / "x.npz", images).batches) == 1
    np.savez(tmp_path / "bad.npz", pixels=array)
    with pytest.raises(UsageError, match="not model inputs"):
        load_calibration(tmp_path / "bad.npz", images)
    from PIL import Image

    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (20, 10), (60 * i, 0, 255)).save(folder / f"{i}.png")
    data = load_calibration(folder, images)
    assert len(data.batches) == 2 and data.batches[0]["image"].shape == (2, 3, 8, 8)
    assert data.batches[1]["image"][1, 0].mean() > data.batches[0]["image"][0, 0].mean()


def test_synthetic_and_missing(tmp_path):
    data = load_calibration(None, TEMPLATE, max_batches=2)
    assert data.synthetic and data.warnings and len(data.batches) == 2
    assert not torch.equal(data.batches[0]["input_ids"], data.batches[1]["input_ids"])
    with pytest.raises(UsageError, match="does not exist"):
        load_calibration(tmp_path / "nope.txt", TEMPLATE)


def test_long_text_is_sampled_over_the_whole_file_unless_evaluation_reads_its_tail(tmp_path):
    """A text longer than the batches need gives windows at even strides over all of it (a
    corpus ordered by topic is not calibrated on its first topic only); with ``spread=False``
    (``--eval-data`` is the same file: evaluation reads what follows the calibration's
    windows) they are the file's first windows."""
    from slimc.calibration import spread_for

    model_dir = _tokenizer_dir(tmp_path / "model")
    text = tmp_path / "calib.txt"
    # 10 tokens per sentence: "the" x9 then one marker word; 4 parts of 25 sentences each,
    # whose markers are cat / sat / on / mat
    text.write_text(" ".join(" ".join(["the"] * 9 + [w]) for w in ["cat", "sat", "on", "mat"]
                             for _ in range(25)))
    vocab = {w: i for i, w in enumerate(WORDS)}

    def markers(data):
        ids = torch.cat([b["input_ids"] for b in data.batches])[:, 1:-1]
        return {WORDS[i] for i in ids.flatten().tolist()} - {"the"}

    spread = load_calibration(text, TEMPLATE, model_dir=model_dir, max_batches=4)
    head = load_calibration(text, TEMPLATE, model_dir=model_dir, max_batches=4, spread=False)
    assert len(spread.batches) == len(head.batches) == 4
    assert markers(head) == {"cat"}  # 4 windows of 10 tokens: the first 40 tokens
    assert markers(spread) == {"cat", "sat", "on", "mat"}
    assert int(spread.batches[0]["input_ids"][0, 1]) == vocab["the"]  # first window: the start
    assert spread_for(text, None) and spread_for(text, tmp_path / "other.txt")
    assert not spread_for(text, tmp_path / "." / "calib.txt")


def test_fractional_npy_for_token_ids_is_refused(tmp_path):
    """Random floats for ``input_ids`` were cast to id 0 and calibrated on silently; whole
    numbers stored as floats are still token ids."""
    np.save(tmp_path / "floats.npy", np.random.default_rng(0).random((4, 12)))
    with pytest.raises(UsageError) as info:
        load_calibration(tmp_path / "floats.npy", TEMPLATE)
    assert "fractional" in str(info.value) and "int64" in str(info.value)
    np.save(tmp_path / "whole.npy", np.arange(48, dtype=np.float32).reshape(4, 12) % 10)
    batches = load_calibration(tmp_path / "whole.npy", TEMPLATE).batches
    assert batches[0]["input_ids"].dtype == torch.int64
    assert batches[0]["input_ids"][0, 3].item() == 3


def test_folder_for_a_text_model_says_it_is_read_as_images(tmp_path):
    """An empty (or any) folder as --calib for a text model said "has no images" (or "holds
    images" when it had some): the error now says a folder is image data and what to give."""
    template = {"input_ids": torch.zeros(1, 8, dtype=torch.int64)}
    (tmp_path / "notes").mkdir()
    with pytest.raises(UsageError, match="no image input") as info:
        load_calibration(tmp_path / "notes", template)
    assert "text file" in info.value.hint
