"""Calibration data for data-aware analyses: ``--calib PATH`` -> batches of model inputs.

Sensitivity criteria that look at activations, gradients or the model's output are only as
good as the inputs they see, so slimc takes real data when it can:

* a text file, tokenized with the model's own tokenizer when the model directory has one
  (else its UTF-8 bytes modulo the vocabulary, with a warning), cut into windows of the
  model's sequence length;
* ``.npy`` (one array, for the first input) or ``.npz`` (arrays named like the inputs);
* a folder of images, resized to the model's input size;
* nothing: synthetic inputs shaped like the example inputs, with a warning that rankings are
  less reliable.

Every batch has exactly the shape of the ``template`` batch size by sequence/image size, because
an exported graph is specialised to one shape: capture the model with the first batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slimc.errors import UsageError
from slimc.loaders.base import random_tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class CalibrationData:
    """Input batches (dicts keyed by input name, in the model's input order)."""

    batches: list[dict[str, torch.Tensor]]
    source: str
    synthetic: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        first = self.batches[0] if self.batches else {}
        return {"source": self.source, "synthetic": self.synthetic, "batches": len(self.batches),
                "batch_shapes": {k: list(v.shape) for k, v in first.items()}}


def load_calibration(path: str | Path | None, template: dict[str, torch.Tensor], *,
                     model_dir: str | Path | None = None, batch_size: int | None = None,
                     max_batches: int = 4, vocab_size: int | None = None,
                     seed: int = 0, spread: bool = True) -> CalibrationData:
    """Read ``path`` into at most ``max_batches`` batches shaped like ``template``.

    ``batch_size`` replaces the template's batch dimension (None keeps it). A text longer than
    the batches need is sampled at even strides over all of it with ``spread`` (the default),
    else from its start (:func:`spread_for`: when evaluation reads what follows in the file).
    """
    if max_batches < 1:
        raise UsageError("The number of calibration batches must be at least 1.")
    template = _rebatch(template, batch_size)
    if path is None:
        return _synthetic(template, max_batches, seed)
    path = Path(path)
    if not path.exists():
        raise UsageError(f"Calibration data {str(path)!r} does not exist.",
                         hint="Give --calib a text file, a .npy/.npz file or a folder of images.")
    if path.is_dir():
        return _images(path, template, max_batches)
    if path.suffix == ".npy":
        return _arrays({_first_input(template): _load_npy(path)}, template, max_batches, path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        unknown = sorted(set(arrays) - set(template))
        if unknown:
            raise UsageError(f"{path} holds arrays {unknown} that are not model inputs.",
                             hint=f"The model's inputs are: {', '.join(template)}.")
        return _arrays(arrays, template, max_batches, path)
    return _text(path, template, max_batches, model_dir, vocab_size, spread)


def _rebatch(template: dict[str, torch.Tensor], batch_size: int | None):
    if batch_size is None:
        return dict(template)
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1.")
    out = {}
    for name, value in template.items():
        if value.dim() == 0:
            out[name] = value
            continue
        reps = math.ceil(batch_size / value.shape[0])
        out[name] = value.repeat(reps, *([1] * (value.dim() - 1)))[:batch_size].clone()
    return out


def _first_input(template: dict[str, torch.Tensor]) -> str:
    return next(iter(template))


def _synthetic(template, max_batches: int, seed: int) -> CalibrationData:
    batches = []
    for i in range(max_batches):
        g = torch.Generator().manual_seed(seed + i)
        high = max(int(v.max()) + 1 for v in template.values() if not v.is_floating_point()) \
            if any(not v.is_floating_point() for v in template.values()) else 2
        batches.append({k: random_tensor(k, tuple(v.shape), v.dtype, high=high, generator=g)
                        for k, v in template.items()})
    return CalibrationData(batches, "synthetic", synthetic=True, warnings=[
        "No --calib data: using synthetic random inputs; data-aware sensitivity rankings "
        "(activation, taylor, hessian, perturbation) are less reliable."])


def _load_npy(path: Path) -> np.ndarray:
    from slimc.npy import read_npy

    return read_npy(path, "--calib")


def _arrays(arrays: dict[str, np.ndarray], template, max_batches: int,
            path: Path) -> CalibrationData:
    """Split arrays of N samples into batches; inputs without an array keep the template's."""
    tensors: dict[str, torch.Tensor] = {}
    for name, array in arrays.items():
        want = template[name]
        if array.dtype.kind not in "biuf":
            raise UsageError(f"{path}: array {name!r} has dtype {array.dtype}; calibration "
                             "data must be numbers.",
                             hint="Store token ids as integers and features as floats.")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise UsageError(f"{path}: array {name!r} holds NaN or Inf.",
                             hint="Clean the data (every value must be a finite number).")
        if (array.dtype.kind == "f" and not want.is_floating_point()
                and not np.array_equal(array, np.round(array))):
            # casting would silently turn random floats into token id 0 (a float .npy saved
            # for another model): calibration would then "succeed" on meaningless data
            raise UsageError(f"{path}: array {name!r} holds fractional numbers "
                             f"({array.dtype}), but the model's input {name!r} takes "
                             f"{str(want.dtype).removeprefix('torch.')} values (token ids or "
                             "indices).",
                             hint=f"Save the {name} as integers (np.save(path, "
                             "ids.astype(np.int64))), or give --calib a text file and let "
                             "slimc tokenize it.")
        value = torch.from_numpy(np.require(array, requirements="C")).to(want.dtype)
        if value.dim() == want.dim() - 1:
            value = value.unsqueeze(0)
        if tuple(value.shape[1:]) != tuple(want.shape[1:]):
            raise UsageError(
                f"{path}: array {name!r} has samples of shape {list(value.shape[1:])}, the model "
                f"expects {list(want.shape[1:])}.",
                hint="Store N samples stacked on the first axis.")
        tensors[name] = value
    batch = next(iter(template.values())).shape[0]
    samples = min(v.shape[0] for v in tensors.values())
    count = min(max_batches, samples // batch)
    if count == 0:
        raise UsageError(f"{path} holds {samples} samples, fewer than one batch of {batch}.")
    batches = []
    for i in range(count):
        batches.append({k: tensors[k][i * batch:(i + 1) * batch] if k in tensors else v
                        for k, v in template.items()})
    return CalibrationData(batches, str(path))


def read_text_data(path: Path, what: str = "Calibration") -> str:
    """``path`` as UTF-8 text, refusing binary data: a weights file or a NumPy array saved
    under a text suffix decodes (with replacement characters) into thousands of tokens the
    model never sees in text, and calibrating or scoring on them succeeds while meaning
    nothing."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"Cannot read {what.replace('Calibration', 'calibration')} data {path}: "
                         f"{exc.strerror}.") from None
    text = raw.decode("utf-8", errors="replace")
    if not text.strip():
        raise UsageError(f"{what} text file {path} is empty.")
    bad = raw.count(0) + text.count("\ufffd")
    if bad > max(8, len(text) // 100):
        raise UsageError(f"{what} file {path} is not UTF-8 text: {bad} of its {len(text):,} "
                         "characters are NUL bytes or undecodable (a binary file?).",
                         hint="Give a UTF-8 text file, a .npy/.npz array file or a folder of "
                         "images.")
    return text


def _token_stream(path: Path, model_dir, vocab_size: int | None, warnings: list[str],
                  what: str = "Calibration"):
    text = read_text_data(path, what)
    tokenizer = None
    if model_dir is not None and any((Path(model_dir) / f).exists() for f in
                                     ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir),
                                                               local_files_only=True,
                                                               trust_remote_code=False)
    if tokenizer is None:
        warnings.append(f"The model has no tokenizer: {path} is fed as UTF-8 bytes modulo the "
                        "vocabulary, which is not how the model reads text.")
        ids = [b % (vocab_size or 256) for b in text.encode("utf-8")]
        return ids, None
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return ids, tokenizer


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """Ids the tokenizer puts before and after a text (``[CLS]``/``[SEP]``, ``<s>``, none)."""
    if tokenizer is None:
        return [], []
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    wrapped = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(wrapped) - len(plain) + 1):
        if wrapped[start:start + len(plain)] == plain:
            return wrapped[:start], wrapped[start + len(plain):]
    return [], []


def spread_for(calib: str | Path | None, eval_data: str | Path | None) -> bool:
    """Whether ``--calib`` text may be sampled over the whole file: not when ``--eval-data``
    is the same file, whose evaluation skips the calibration's batches at its start and reads
    what follows (it must stay held out)."""
    if calib is None or eval_data is None:
        return True
    return Path(eval_data).resolve() != Path(calib).resolve()


def _text(path: Path, template, max_batches: int, model_dir, vocab_size,
          spread: bool = True) -> CalibrationData:
    if "input_ids" not in template:
        raise UsageError(f"{path} is text, but the model takes no input_ids "
                         f"(its inputs: {', '.join(template)}).",
                         hint="Give .npy/.npz arrays or a folder of images instead.")
    warnings: list[str] = []
    ids, tokenizer = _token_stream(path, model_dir, vocab_size, warnings)
    batch, seq = template["input_ids"].shape[:2]
    prefix, suffix = _special_tokens(tokenizer)
    window = max(seq - len(prefix) - len(suffix), 1)
    count = min(max_batches, len(ids) // (window * batch))
    if count == 0:
        warnings.append(f"{path} has {len(ids)} tokens, fewer than one batch of "
                        f"{batch}x{seq}; it is repeated to fill one.")
        ids = (ids * math.ceil(window * batch / max(len(ids), 1)))[:window * batch]
        count = 1
    rows = [(prefix + ids[start:start + window] + suffix)[:seq]
            for start in window_starts(len(ids), window, count * batch, spread)]
    all_ids = torch.tensor(rows, dtype=template["input_ids"].dtype)
    batches = []
    for i in range(count):
        b = dict(template)
        b["input_ids"] = all_ids[i * batch:(i + 1) * batch]
        for name in ("attention_mask", "token_type_ids"):
            if name in b:
                fill = 1 if name == "attention_mask" else 0
                b[name] = torch.full_like(template[name], fill)
        batches.append(b)
    return CalibrationData(batches, str(path), warnings=warnings)


def window_starts(tokens: int, window: int, wanted: int, spread: bool = True) -> list[int]:
    """Start offsets of ``wanted`` windows of ``window`` tokens, spread at even strides over
    all ``tokens`` (consecutive from the start without ``spread`` or when there are no more
    than ``wanted``).

    Why: a long calibration text (a corpus, a book) is usually ordered by topic; its first
    windows are one topic. On SmolLM2-135M, distilling a low-rank model on 24,576 tokens
    spread over the KJV reached 27.70 John perplexity where the first 24,576 tokens of one
    section (Leviticus-Deuteronomy) stayed at 28.85 (docs/benchmarks.md, issue 13).
    """
    available = tokens // window
    if not spread or available <= wanted:
        return [i * window for i in range(min(wanted, available))]
    return [(i * available // wanted) * window for i in range(wanted)]


def read_image(file: Path, channels: int, height: int, width: int) -> torch.Tensor:
    """One image as the model's ``CxHxW`` input: resized, scaled to [0, 1], and normalised
    with ImageNet's mean and std when it has 3 channels (also used by task evaluation)."""
    from PIL import Image

    try:
        with Image.open(file) as im:
            im = im.convert("RGB" if channels == 3 else "L").resize((width, height))
            array = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UsageError(f"Cannot read image {file}: {type(exc).__name__}: {exc}",
                         hint="Remove or replace the file; slimc reads every image in "
                         "the folder.") from None
    pixels = torch.from_numpy(array).reshape(height, width, -1).permute(2, 0, 1)
    if channels == 3:
        pixels = (pixels - torch.tensor(_IMAGENET_MEAN).view(3, 1, 1)) / \
            torch.tensor(_IMAGENET_STD).view(3, 1, 1)
    return pixels


def folder_entries(folder: Path, option: str) -> list[Path]:
    """The sorted entries of a data folder the user named; an unreadable folder (or one that
    vanished while it was read) is the user's to fix, so it is a usage error, not a traceback."""
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise UsageError(f"{option}: cannot read the folder {folder} "
                         f"({exc.strerror or exc}).",
                         hint=f"Give {option} a folder that exists and that you can read.") \
            from None


def _images(folder: Path, template, max_batches: int) -> CalibrationData:
    # the model first: a folder is read as images whatever it holds, and an empty folder
    # given to a text model is not a matter of "no images"
    name = next((k for k, v in template.items() if v.is_floating_point() and v.dim() == 4), None)
    if name is None:
        raise UsageError(f"--calib {folder} is a folder, which slimc reads as images, but the "
                         f"model has no image input (NxCxHxW float); its inputs: "
                         f"{', '.join(template)}.",
                         hint="Give --calib a text file (tokenized with the model's tokenizer) "
                         "or a .npy/.npz of input arrays.")
    files = [p for p in folder_entries(folder, "--calib") if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise UsageError(f"{folder} has no images ({', '.join(IMAGE_SUFFIXES)}).")
    batch, channels, height, width = template[name].shape
    pictures = [read_image(file, channels, height, width) for file in files[:batch * max_batches]]
    warnings = []
    if len(pictures) < batch:
        warnings.append(f"{folder} has {len(pictures)} images, fewer than one batch of {batch}; "
                        "they are repeated to fill it.")
        pictures = (pictures * batch)[:batch]
    stacked = torch.stack(pictures).to(template[name].dtype)
    batches = [{**template, name: stacked[i * batch:(i + 1) * batch]}
               for i in range(len(pictures) // batch)]
    return CalibrationData(batches, str(folder), warnings=warnings)
