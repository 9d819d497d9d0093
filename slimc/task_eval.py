"""Task-level quality: is the compressed artifact still good at its job?

Fidelity metrics (:mod:`slimc.evaluators`) compare raw outputs on one random input, which says
little about a task: int4 can look bad there and lose nothing on the task, pruning can look
fine there and lose a lot. A *task evaluator* instead scores the model on labelled data
(``--eval-data PATH``), once for the original model (the captured fp32 graph, before any pass)
and once for the artifact (the built library, run on this host), and the compile reports both
and the drop, warns above :data:`DEFAULT_WARN_DROP` and fails with ``--max-drop``.

Built-ins (``--eval KIND``; without it, chosen from the data):

* ``perplexity``: a text file, tokenized with the model's tokenizer, cut into windows of the
  model's sequence length; next-token perplexity from the first output (logits). Lower is
  better.
* ``spearman``: a CSV/TSV of ``text1, text2, score`` rows (STS sentence pairs or WordSim-353
  word pairs); Spearman correlation between the gold scores and the cosine similarity of the
  two embeddings: token states mean-pooled over real tokens (what sentence-transformers does),
  or the model's pooled ``[batch, hidden]`` output when it has no token states.
* ``accuracy``: a folder ``<label>/<image>`` of labelled images; top-1 (and top-5) accuracy of
  the first ``[batch, classes]`` output. Labels that are integers are class indices, otherwise
  the sorted label names are.

Plugins add evaluators by returning :class:`TaskEvaluator` objects from
``slimc_register_evaluators``; ``--eval module:function`` calls a user's function
``function(model, data_path) -> float`` where ``model(**arrays)`` (or ``model(list)``) returns
the model's outputs as numpy arrays (higher is better unless the function has a
``higher_is_better = False`` attribute).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimc.errors import UsageError

#: The compile warns when the task metric gets worse by more than this share of the original.
DEFAULT_WARN_DROP = 0.02

Arrays = list[np.ndarray]
#: A model as evaluators see it: the inputs in the model's input order -> its outputs.
ModelFn = Callable[[Sequence[np.ndarray]], Arrays]


@dataclass
class EvalContext:
    """What an evaluator needs to shape its data like the model's inputs."""

    input_names: list[str]
    template: dict[str, np.ndarray]  # example inputs (fixed shapes: the graph is specialised)
    model_dir: str | None  # where the tokenizer lives, if any
    max_batches: int
    #: Batches at the start of the data that calibration used (same file): skip them.
    skip: int = 0


@dataclass
class TaskData:
    """Prepared batches plus how to turn the model's outputs on them into the metric."""

    batches: list[Arrays]
    score: Callable[[list[Arrays]], dict[str, float]]  # first key: the headline metric
    examples: int
    note: str = ""


@dataclass(frozen=True)
class TaskEvaluator:
    """A task metric (registered through ``slimc_register_evaluators`` like fidelity ones)."""

    name: str
    description: str
    label: str  # how a person names the metric ("perplexity", "Spearman")
    higher_is_better: bool
    accepts: Callable[[Path], bool]
    prepare: Callable[[Path | None, EvalContext], TaskData]
    #: what ``--eval-data`` must be: "file" or "folder" (a named metric given the other one
    #: is refused by :func:`choose` up front, not by whichever reader it reaches first)
    reads: str = "file"


# ---------------------------------------------------------------------------------------------
# Built-ins
# ---------------------------------------------------------------------------------------------


def _is_text(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() not in (".csv", ".tsv", ".npy", ".npz")


def _is_pairs(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in (".csv", ".tsv")


def _is_labelled_folder(path: Path) -> bool:
    from slimc.calibration import folder_entries

    return path.is_dir() and any(p.is_dir() for p in folder_entries(path, "--eval-data"))


def _has_tokenizer(ctx: EvalContext, path: Path) -> None:
    if ctx.model_dir is None or not any((Path(ctx.model_dir) / f).exists() for f in
                                        ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise UsageError(f"--eval-data {path} is text, but the model has no tokenizer to read it.",
                         hint="Compile a Hugging Face model folder that includes its tokenizer.")


def _tokenizer(ctx: EvalContext, path: Path):
    _has_tokenizer(ctx, path)
    import transformers

    return transformers.AutoTokenizer.from_pretrained(ctx.model_dir, local_files_only=True,
                                                      trust_remote_code=False)


def _fill(ctx: EvalContext, name: str, value: np.ndarray) -> Arrays:
    """One batch: ``value`` for input ``name``, all-ones masks, the template for the rest."""
    out = []
    for n in ctx.input_names:
        t = ctx.template[n]
        if n == name:
            out.append(value.astype(t.dtype))
        elif n == "attention_mask":
            out.append(np.ones_like(t))
        elif n == "token_type_ids":
            out.append(np.zeros_like(t))
        else:
            out.append(t)
    return out


def _prepare_perplexity(path: Path | None, ctx: EvalContext) -> TaskData:
    from slimc.calibration import _special_tokens, _token_stream

    path = _require(path, "perplexity", "a text file")
    if "input_ids" not in ctx.template:
        raise UsageError("Perplexity needs a language model (an input_ids input); this model "
                         f"takes {', '.join(ctx.input_names)}.", hint="Use --eval accuracy or "
                         "spearman, or your own metric with --eval module:function.")
    _has_tokenizer(ctx, path)  # perplexity of bytes the model never saw means nothing
    ids, tokenizer = _token_stream(path, ctx.model_dir, None, [], "--eval-data")
    batch, seq = ctx.template["input_ids"].shape[:2]
    prefix, suffix = _special_tokens(tokenizer)
    window = max(seq - len(prefix) - len(suffix), 2)
    ids = ids[ctx.skip * batch * window:]
    rows = [prefix + ids[i:i + window] + suffix for i in range(0, len(ids) - window + 1, window)]
    rows = rows[:ctx.max_batches * batch]
    if len(rows) < batch:
        raise UsageError(f"--eval-data {path} has too little text for one batch of {batch}x"
                         f"{seq} tokens after the part used for calibration.",
                         hint="Give a longer text file, or a separate file for --calib.")
    rows = rows[:len(rows) // batch * batch]
    tokens = np.array(rows, dtype=np.int64)
    batches = [_fill(ctx, "input_ids", tokens[i:i + batch]) for i in range(0, len(rows), batch)]
    first, last = len(prefix), len(prefix) + window  # score predictions of real text tokens

    def score(outputs: list[Arrays]) -> dict[str, float]:
        nll, count = 0.0, 0
        for b, out in enumerate(outputs):
            logits = np.asarray(out[0], dtype=np.float64)
            if logits.ndim != 3 or logits.shape[:2] != (batch, seq):
                raise UsageError(f"Perplexity needs logits [batch, sequence, vocab] as the first "
                                 f"output; this model returns {list(logits.shape)}.",
                                 hint="Use a causal LM (…ForCausalLM) or another --eval kind.")
            target = tokens[b * batch:(b + 1) * batch, first + 1:last]
            pred = logits[:, first:last - 1]
            pred = pred - pred.max(-1, keepdims=True)
            logp = pred - np.log(np.exp(pred).sum(-1, keepdims=True))
            nll -= float(np.take_along_axis(logp, target[..., None], -1).sum())
            count += target.size
        return {"perplexity": math.exp(nll / max(count, 1))}

    return TaskData(batches, score, examples=len(rows) * (window - 1),
                    note=f"{len(rows)} windows of {seq} tokens, {len(rows) * (window - 1)} "
                    "predicted tokens")


def _read_pairs(path: Path) -> list[tuple[str, str, float]]:
    import csv

    from slimc.calibration import read_text_data

    text = read_text_data(path, "--eval-data")
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = "\t" if "\t" in first_line else ","
    pairs = []
    for row in csv.reader(text.splitlines(), delimiter=delimiter):
        if len(row) < 3 or not row[0].strip():
            continue
        try:
            pairs.append((row[0].strip(), row[1].strip(), float(row[2])))
        except ValueError:  # a header line
            continue
    if len(pairs) < 3:
        raise UsageError(f"--eval-data {path} holds {len(pairs)} scored pairs; Spearman needs "
                         "at least 3.", hint="One pair per line: text1<TAB>text2<TAB>score "
                         "(or comma-separated).")
    return pairs


def _prepare_spearman(path: Path | None, ctx: EvalContext) -> TaskData:
    from scipy.stats import spearmanr

    path = _require(path, "spearman", "a TSV/CSV of text1, text2, score")
    if "input_ids" not in ctx.template:
        raise UsageError(f"Spearman on text pairs needs a text model (an input_ids input); this "
                         f"model takes {', '.join(ctx.input_names)}.")
    batch, seq = ctx.template["input_ids"].shape[:2]
    pairs = _read_pairs(path)[ctx.skip * batch:]
    pairs = _within(pairs, ctx.max_batches * batch)
    if len(pairs) < 3:
        raise UsageError(f"Only {len(pairs)} pairs of {path} fit in --eval-batches "
                         f"{ctx.max_batches} batches of {batch} texts (after any part used for "
                         "calibration); Spearman needs at least 3.",
                         hint="Raise --eval-batches, or use a larger batch in --input.")
    texts = sorted({t for a, b, _ in pairs for t in (a, b)})
    tokenizer = _tokenizer(ctx, path)
    enc = tokenizer(texts, truncation=True, max_length=seq, padding="max_length",
                    return_tensors="np")
    n = len(texts)
    padded = math.ceil(n / batch) * batch
    ids = np.resize(enc["input_ids"], (padded, seq))
    mask = np.resize(enc["attention_mask"], (padded, seq))
    batches = []
    for i in range(0, padded, batch):
        arrays = _fill(ctx, "input_ids", ids[i:i + batch])
        if "attention_mask" in ctx.input_names:
            arrays[ctx.input_names.index("attention_mask")] = \
                mask[i:i + batch].astype(ctx.template["attention_mask"].dtype)
        batches.append(arrays)
    index = {t: i for i, t in enumerate(texts)}
    gold = np.array([s for _, _, s in pairs])

    def score(outputs: list[Arrays]) -> dict[str, float]:
        emb = np.concatenate([_embed(out, mask[i * batch:(i + 1) * batch], batch, seq)
                              for i, out in enumerate(outputs)])[:n]
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        cos = np.array([emb[index[a]] @ emb[index[b]] for a, b, _ in pairs])
        return {"spearman": float(spearmanr(gold, cos).statistic)}

    return TaskData(batches, score, examples=len(pairs),
                    note=f"{len(pairs)} scored pairs, {n} distinct texts")


def _within(pairs: list[tuple[str, str, float]], most: int) -> list[tuple[str, str, float]]:
    """The leading pairs whose distinct texts fit in ``most`` model inputs."""
    seen: set[str] = set()
    for i, (a, b, _) in enumerate(pairs):
        if len(seen | {a, b}) > most:
            return pairs[:i]
        seen |= {a, b}
    return pairs


def _embed(outputs: Arrays, mask: np.ndarray, batch: int, seq: int) -> np.ndarray:
    """Mean of the token states over real tokens, else the pooled ``[batch, hidden]`` output."""
    for out in outputs:
        out = np.asarray(out, dtype=np.float64)
        if out.ndim == 3 and out.shape[:2] == (batch, seq):
            m = mask[..., None].astype(np.float64)
            return (out * m).sum(1) / np.maximum(m.sum(1), 1)
    for out in outputs:
        if out.ndim == 2 and out.shape[0] == batch:
            return np.asarray(out, dtype=np.float64)
    raise UsageError("Spearman needs token states [batch, sequence, hidden] or an embedding "
                     f"[batch, hidden]; the model returns {[list(o.shape) for o in outputs]}.")


def _prepare_accuracy(path: Path | None, ctx: EvalContext) -> TaskData:
    from slimc.calibration import IMAGE_SUFFIXES, folder_entries, read_image

    path = _require(path, "accuracy", "a folder of <label>/<image> files")
    name = next((k for k in ctx.input_names if ctx.template[k].dtype.kind == "f"
                 and ctx.template[k].ndim == 4), None)
    if name is None:
        kinds = ("perplexity (a text file, causal LMs) or spearman (scored text pairs, "
                 "encoders)") if "input_ids" in ctx.template else "another --eval kind"
        raise UsageError(f"--eval accuracy scores image classification (--eval-data: a folder "
                         f"of <label>/<image> files), but this model has no image input "
                         f"(NxCxHxW float); its inputs: {', '.join(ctx.input_names)}.",
                         hint=f"For this model use {kinds} with --eval-data {path}, or leave "
                         "--eval out to let slimc pick the metric from the data.")
    labels = [p.name for p in folder_entries(path, "--eval-data") if p.is_dir()]
    numeric = all(lb.isdigit() for lb in labels)
    files = [(f, int(lb) if numeric else i) for i, lb in enumerate(labels)
             for f in folder_entries(path / lb, "--eval-data")
             if f.suffix.lower() in IMAGE_SUFFIXES]
    batch, channels, height, width = ctx.template[name].shape
    files = files[ctx.skip * batch:]
    files = files[:ctx.max_batches * batch]
    if not files:
        raise UsageError(f"--eval-data {path} has no images in label folders.",
                         hint=f"Lay it out as {path}/<label>/<image> "
                         f"({', '.join(IMAGE_SUFFIXES)}).")
    images = np.stack([read_image(f, channels, height, width).numpy() for f, _ in files])
    truth = np.array([label for _, label in files])
    padded = math.ceil(len(files) / batch) * batch
    images = np.resize(images, (padded, *images.shape[1:]))
    batches = [_fill(ctx, name, images[i:i + batch]) for i in range(0, padded, batch)]

    def score(outputs: list[Arrays]) -> dict[str, float]:
        logits = []
        for out in outputs:
            first = next((np.asarray(o) for o in out if o.ndim == 2 and o.shape[0] == batch
                          and o.shape[1] > 1), None)
            if first is None:
                raise UsageError("Accuracy needs class scores [batch, classes]; the model "
                                 f"returns {[list(o.shape) for o in out]}.")
            logits.append(first)
        scores = np.concatenate(logits)[:len(files)]
        ranked = np.argsort(-scores, axis=1)
        result = {"top1_accuracy": float(np.mean(ranked[:, 0] == truth))}
        if scores.shape[1] > 5:
            result["top5_accuracy"] = float(np.mean((ranked[:, :5] == truth[:, None]).any(1)))
        return result

    return TaskData(batches, score, examples=len(files),
                    note=f"{len(files)} images in {len(labels)} label folders")


def _require(path: Path | None, kind: str, what: str) -> Path:
    if path is None:
        raise UsageError(f"--eval {kind} needs --eval-data: {what}.")
    return path


BUILTIN_TASK_EVALUATORS = [
    TaskEvaluator("perplexity", "next-token perplexity on held-out text (causal LMs)",
                  "perplexity", False, _is_text, _prepare_perplexity),
    TaskEvaluator("spearman", "Spearman correlation of embedding cosine similarity with gold "
                  "scores on text pairs (encoders)", "Spearman", True, _is_pairs,
                  _prepare_spearman),
    TaskEvaluator("accuracy", "top-1 / top-5 accuracy on a labelled image folder "
                  "(classifiers)", "top-1 accuracy", True, _is_labelled_folder,
                  _prepare_accuracy, reads="folder"),
]


# ---------------------------------------------------------------------------------------------
# User metrics: --eval module:function
# ---------------------------------------------------------------------------------------------


class UserModel:
    """The model handed to a user's metric: ``model(**arrays)`` or ``model([arrays])``."""

    def __init__(self, run: ModelFn, ctx: EvalContext):
        self._run, self.input_names = run, list(ctx.input_names)
        self.example_inputs = dict(ctx.template)

    def __call__(self, *args, **named) -> Arrays:
        if named:
            arrays = [np.asarray(named.get(n, self.example_inputs[n])) for n in self.input_names]
        else:
            arrays = [np.asarray(a) for a in (args[0] if len(args) == 1 and isinstance(
                args[0], list | tuple) else args)]
        return self._run(arrays)


def user_evaluator(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    try:
        if module_name.endswith(".py") or "/" in module_name:
            file = Path(module_name)
            loader = importlib.util.spec_from_file_location(file.stem, file)
            if loader is None or not file.is_file():
                raise ImportError(f"no file {file}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            sys.path.insert(0, str(Path.cwd()))
            try:
                module = importlib.import_module(module_name)
            finally:
                sys.path.pop(0)
        fn = getattr(module, attr)
    except (ImportError, AttributeError, SyntaxError) as exc:
        raise UsageError(f"--eval {spec}: cannot load the metric ({type(exc).__name__}: {exc}).",
                         hint="Give module:function (importable from here) or path/file.py:"
                         "function; the function takes (model, data_path) and returns a "
                         "number.") from None
    if not callable(fn):
        raise UsageError(f"--eval {spec}: {attr} is not a function.")
    return fn


# ---------------------------------------------------------------------------------------------
# Choosing and running
# ---------------------------------------------------------------------------------------------


def _check_kind_of_data(ev: TaskEvaluator, data: Path | None,
                        tasks: dict[str, TaskEvaluator]) -> None:
    """Refuse a file where ``ev`` reads a folder and the other way round, naming both."""
    if data is None or data.is_dir() == (ev.reads == "folder"):
        return
    given = "a folder" if data.is_dir() else "a file"
    fits = [k for k, other in tasks.items() if other is not ev and other.accepts(data)]
    raise UsageError(f"--eval {ev.name} scores {ev.description}: its --eval-data is a "
                     f"{ev.reads}, but {data} is {given}.",
                     hint=(f"--eval-data {data} fits --eval {' or '.join(fits)}; or give "
                           f"--eval {ev.name} a {ev.reads}." if fits else
                           f"Give --eval {ev.name} a {ev.reads}, or leave --eval out to let "
                           "slimc pick the metric from the data."))


def choose(kind: str | None, data: Path | None, evaluators: dict[str, Any]) -> Any:
    """The evaluator ``--eval KIND`` names, or the one that accepts ``data``."""
    tasks = {k: v for k, v in evaluators.items() if isinstance(v, TaskEvaluator)}
    if data is not None and not data.exists():
        raise UsageError(f"--eval-data {data} does not exist.",
                         hint="Give a text file, a TSV/CSV of scored pairs, or a folder of "
                         "<label>/<image> files.")
    if kind and ":" in kind and kind.split(":")[0] not in tasks:
        return kind
    if kind:
        if kind not in tasks:
            raise UsageError(f"--eval {kind} is not a known task metric.",
                             hint=f"Use one of {', '.join(sorted(tasks))}, or module:function "
                             "for your own.")
        _check_kind_of_data(tasks[kind], data, tasks)
        return tasks[kind]
    for ev in tasks.values():
        if data is not None and ev.accepts(data):
            return ev
    raise UsageError(f"Cannot tell which task metric fits --eval-data {data}.",
                     hint=f"Name it with --eval ({', '.join(sorted(tasks))} or "
                     "module:function).")


@dataclass
class TaskEvaluation:
    """A prepared evaluation, run once per model (the original, then the artifact)."""

    name: str
    label: str
    higher_is_better: bool
    data: str | None
    run_one: Callable[[ModelFn], dict[str, float]]
    examples: int | None
    note: str = ""
    held_out: str = ""
    values: dict[str, dict[str, float]] = field(default_factory=dict)

    def measure(self, which: str, model: ModelFn) -> dict[str, float]:
        self.values[which] = {k: float(v) for k, v in self.run_one(model).items()}
        return self.values[which]

    def to_json(self, artifact_ran_on: str) -> dict[str, Any]:
        orig, art = self.values["original"], self.values["artifact"]
        key = next(iter(orig))
        o, a = orig[key], art[key]
        change = (a - o) / abs(o) if o else (0.0 if a == o else math.inf)
        drop = -change if self.higher_is_better else change
        return {"metric": key, "label": self.label, "evaluator": self.name,
                "higher_is_better": self.higher_is_better, "original": o, "artifact": a,
                "change": change, "drop": drop, "all": {"original": orig, "artifact": art},
                "compared": f"original model (fp32 torch, before any pass) vs {artifact_ran_on}",
                "data": self.data, "examples": self.examples, "note": self.note,
                "held_out": self.held_out}


def prepare(kind: str | None, data: str | Path | None, ctx: EvalContext,
            evaluators: dict[str, Any], held_out: str = "") -> TaskEvaluation:
    path = Path(data) if data is not None else None
    chosen = choose(kind, path, evaluators)
    if isinstance(chosen, str):
        fn = user_evaluator(chosen)
        higher = bool(getattr(fn, "higher_is_better", True))

        def run_user(model: ModelFn) -> dict[str, float]:
            value = fn(UserModel(model, ctx), str(path) if path else None)
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                raise UsageError(f"--eval {chosen} returned {type(value).__name__}, not a number.")
            return {chosen.rpartition(":")[2]: float(value)}

        return TaskEvaluation(chosen, chosen.rpartition(":")[2], higher, str(path) if path
                              else None, run_user, None, held_out=held_out)
    task = chosen.prepare(path, ctx)
    return TaskEvaluation(chosen.name, _label(chosen, path), chosen.higher_is_better,
                          str(path) if path else None,
                          lambda model: task.score([model(b) for b in task.batches]),
                          task.examples, task.note, held_out)


def _label(ev: TaskEvaluator, path: Path | None) -> str:
    return f"{ev.label} on {path.name}" if path is not None else ev.label


def describe(quality: dict[str, Any]) -> str:
    """One line a person reads: ``Spearman on ws.tsv: 0.729 (original fp32) -> 0.712 (this
    artifact), -2.3%``."""
    change = quality["change"]
    pct = f"{change * 100:+.1f}%" if math.isfinite(change) else "n/a"
    return (f"{quality['label']}: {quality['original']:.4g} (original fp32) -> "
            f"{quality['artifact']:.4g} (this artifact), {pct}")
