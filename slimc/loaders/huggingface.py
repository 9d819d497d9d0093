"""Load a local Hugging Face model directory (config.json + safetensors/bin weights).

The model class comes from ``config.architectures`` (falling back to ``AutoModel``) and example
inputs from the config: token ids below the vocabulary size and an all-ones attention mask for
text models, ``pixel_values`` of the configured image size for vision models.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import warnings
from pathlib import Path

import torch

from slimc.errors import UsageError
from slimc.loaders.base import (
    DEFAULT_SEQUENCE,
    TRUST_REMOTE_CODE,
    DimRange,
    InputOverride,
    LoadedModel,
    agree,
    apply_overrides,
    dynamic_dims,
    random_tensor,
)
from slimc.loaders.sentence_pooling import SentenceEncoder, read_pooling

#: Default (example) sequence length for text models when ``--input`` does not say otherwise.
DEFAULT_SEQ_LEN = 128
#: Inputs of a text model that share one ``[batch, sequence]`` shape.
SEQUENCE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
#: Text models (every input a token id, mask, token type or position) get a dynamic sequence
#: length ``1..max_position_embeddings`` (at most :data:`MAX_DEFAULT_SEQUENCE`) unless
#: ``--input`` shapes them: tokenizer output of any length runs as is, no padding to 128. The
#: environment variable ``SLIMC_DEFAULT_SEQUENCE=fixed|dynamic`` overrides this (see
#: docs/shapes.md for what a dynamic length costs).
DYNAMIC_SEQUENCE_BY_DEFAULT = True
#: Cap of the default dynamic bound. TVM plans activation memory for a symbol's upper bound:
#: an LLM with 32768 positions would reserve its attention scores for 32768^2 entries per
#: head. 1024 covers every BERT-style encoder (512) and GPT-2 (1024); longer contexts are an
#: explicit ``--input input_ids=1x1..N:int64``.
MAX_DEFAULT_SEQUENCE = 1024
#: The environment variable choosing the default sequence length (``fixed`` or ``dynamic``).
SEQUENCE_ENV = "SLIMC_DEFAULT_SEQUENCE"
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


class HuggingFaceLoader:
    name = "huggingface"
    description = "local Hugging Face model directory (config.json + weights)"

    def accepts(self, model: str) -> bool:
        return (Path(model) / "config.json").is_file()

    def load(self, model: str, overrides: dict[str, InputOverride]) -> LoadedModel:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
        import transformers

        path = Path(model)
        trust = TRUST_REMOTE_CODE.get()
        _refuse_remote_code(path, trust)
        config = _load_config(path, transformers, trust)
        if not any(list(path.glob(p)) for p in _WEIGHT_FILES):
            raise UsageError(
                f"{path} has a config.json but no weights (*.safetensors or *.bin).",
                hint="Save the model with model.save_pretrained(path) so the weights sit next "
                "to config.json.",
            )
        cls = _model_class(config, transformers, trust)
        try:
            with warnings.catch_warnings():
                # torch's weights-only unpickler warns about pickle protocols it was not
                # written with; the load below either succeeds or says what failed
                warnings.filterwarnings("ignore", module=r"torch\._weights_only_unpickler")
                module = cls.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                             trust_remote_code=trust)
        except pickle.UnpicklingError:
            raise UsageError(
                f"The pickle weights in {path} (*.bin) hold objects other than tensors. slimc "
                "reads pickles with torch's weights-only unpickler, so that loading a model "
                "cannot run code hidden in it, and this file needs more than that.",
                hint="Do not load it at all unless you trust where it came from; if you do, "
                "re-save it as safetensors in a separate Python session "
                "(model.save_pretrained(path, safe_serialization=True)) and compile that.",
            ) from None
        except Exception as exc:  # noqa: BLE001 - report which file could not be read
            raise UsageError(
                f"Could not load the weights in {path} with {cls.__name__}: "
                f"{type(exc).__name__}: {_first_line(exc)}",
                hint="Check that the weight files are complete (not truncated or a git-lfs "
                "pointer) and match config.json.",
            ) from None
        module.eval()
        if hasattr(module.config, "_experts_implementation"):
            # Mixture-of-experts layers: the default grouped_mm path sorts tokens by expert
            # (histc + transformers' grouped_mm_fallback op, which TVM cannot lower);
            # batched_mm gathers each token's experts' weights instead: static shapes, same
            # values.
            module.config._experts_implementation = "batched_mm"
        for sub in module.modules():  # encoder-decoder stacks carry their own config copies
            config_of_sub = getattr(sub, "config", None)
            if hasattr(config_of_sub, "use_cache"):
                config_of_sub.use_cache = False  # a KV cache is not a tensor output to compile
        accepted = [p for p in inspect.signature(module.forward).parameters
                    if p not in ("self", "kwargs", "args")]
        pooling, pooling_skipped = read_pooling(path)
        if pooling is not None:
            module = SentenceEncoder(module, pooling).eval()
            accepted = [p for p in accepted if p in SEQUENCE_INPUTS]
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = int(getattr(text_config, "vocab_size", 2) or 2)
        inputs = _default_inputs(config, text_config, accepted, vocab, module)
        if not inputs and not overrides:
            raise UsageError(
                f"slimc cannot guess example inputs for {cls.__name__}.",
                hint="Give them with --input NAME=SHAPE:DTYPE, e.g. --input "
                f"{accepted[0]}=1x128:float32 (its forward takes: {', '.join(accepted[:8])}).",
            )
        user_shaped = any(ov.shape for ov in overrides.values())
        overrides = _sequence_overrides(overrides, inputs, accepted, text_config, module)
        inputs = apply_overrides(inputs, overrides, accepted=accepted, high=vocab)
        _check_positions(text_config, inputs, module)
        has_tokenizer = any((path / f).exists() for f in
                            ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
        return LoadedModel(
            name=_model_name(path), module=module, example_inputs=inputs, as_kwargs=True,
            source=str(path), kind=self.name, dynamic=dynamic_dims(overrides),
            extra={"architecture": cls.__name__,
                   "model_type": getattr(config, "model_type", ""),
                   "tokenizer": str(path) if has_tokenizer else None,
                   "pooling": pooling.describe() if pooling else None,
                   "pooling_skipped": pooling_skipped,
                   "max_seq_length": pooling.max_seq_length if pooling else None,
                   # how the sequence length was chosen when --input did not shape it
                   "default_sequence": None if user_shaped or "input_ids" not in inputs else (
                       "dynamic" if "input_ids" in dynamic_dims(overrides) else "fixed")},
        )


def _check_positions(text_config, inputs: dict[str, torch.Tensor],
                     module: torch.nn.Module | None = None) -> None:
    """A sequence longer than the model's position table cannot be run (it would index past
    the position embeddings)."""
    limit = max_positions(text_config, module)
    if not isinstance(limit, int):
        return
    for name in ("input_ids", "decoder_input_ids", "attention_mask", "token_type_ids"):
        value = inputs.get(name)
        if value is not None and value.dim() >= 2 and value.shape[-1] > limit:
            raise UsageError(f"--input {name}: sequence length {value.shape[-1]} is longer "
                             f"than the model's {limit} positions (its position table).",
                             hint=f"Use at most {limit} tokens, e.g. --input "
                             f"{name}={value.shape[0]}x{limit}:int64.")


def _model_name(path: Path) -> str:
    """The folder's name, or its parent's when the folder has a generic name like 'model'."""
    path = path.resolve()
    generic = ("model", "models", "snapshot", "hf", "checkpoint")
    if path.name.lower() in generic and path.parent.name:
        return path.parent.name
    return path.name


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _remote_code_files(path: Path) -> list[str]:
    """Config files of ``path`` whose ``auto_map`` asks transformers to import the folder's own
    Python code."""
    found = []
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json",
                 "processor_config.json"):
        try:
            data = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            found.append(name)
    return found


def _refuse_remote_code(path: Path, trust: bool) -> None:
    """Custom model code runs only with --trust-remote-code; never ask on stdin."""
    files = _remote_code_files(path)
    if files and not trust:
        scripts = sorted(p.name for p in path.glob("*.py"))
        raise UsageError(
            f"{path} ships its own Python code ({', '.join(files)} has an auto_map"
            + (f"; {', '.join(scripts[:4])}" if scripts else "") + "), which slimc does not "
            "run by default.", hint="Read that code; if you trust it, pass --trust-remote-code "
            "(CompileOptions(trust_remote_code=True)).")


def _load_config(path: Path, transformers, trust: bool = False):
    try:
        json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path / 'config.json'} is not valid JSON ({exc}).") from None
    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True,
                                                       trust_remote_code=trust)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(
            f"transformers cannot read {path / 'config.json'}: {_first_line(exc)}",
            hint="Check its model_type; it must name an architecture this transformers "
            f"({transformers.__version__}) knows.",
        ) from None


def _model_class(config, transformers, trust: bool = False):
    auto_map = getattr(config, "auto_map", None) or {}
    if trust and auto_map:  # the folder's own classes, through the Auto class that names them
        for key in ("AutoModel", *sorted(k for k in auto_map if k.startswith("AutoModel"))):
            if key in auto_map and hasattr(transformers, key):
                return getattr(transformers, key)
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    try:
        return transformers.AutoModel._model_mapping[type(config)]
    except KeyError:
        raise UsageError(f"transformers has no model class for {type(config).__name__} "
                         f"(architectures: {getattr(config, 'architectures', None)}).",
                         hint="Set config.json's architectures to a transformers class.") from None


def _dim(value, default: int) -> int:
    """A config length, or ``default`` when it is not stated: missing, 0, or negative (XLNet's
    ``max_position_embeddings`` is -1, "no limit"; read as a length it made a ``1x-1`` input)."""
    if isinstance(value, (list, tuple)):
        value = value[0]
    return int(value) if value and int(value) > 0 else default


def max_positions(text_config, module: torch.nn.Module | None = None) -> int | None:
    """The longest sequence the model's position embeddings allow (None: not stated).

    With ``module``: RoBERTa-style models (XLM-R, CamemBERT, MPNet, Longformer, ...) number
    positions from ``padding_idx + 1``, so a table of ``max_position_embeddings`` rows holds
    ``padding_idx + 1`` fewer tokens; a longer sequence indexes past it. Such a table is an
    ``nn.Embedding`` named like a position table, of exactly that many rows, with a
    ``padding_idx``."""
    value = (getattr(text_config, "max_position_embeddings", None)
             or getattr(text_config, "n_positions", None)
             # MPT: its ALiBi bias has max_seq_len columns; a longer example failed to capture
             or getattr(text_config, "max_seq_len", None))
    limit = _dim(value, 0) or None
    if limit is None or module is None:
        return limit
    offsets = [sub.padding_idx + 1 for name, sub in module.named_modules()
               if isinstance(sub, torch.nn.Embedding) and "position" in name.lower()
               and sub.num_embeddings == limit and sub.padding_idx is not None
               and sub.padding_idx >= 0]
    return limit - max(offsets) if offsets and limit > max(offsets) else limit


def default_sequence() -> str:
    """``"dynamic"`` or ``"fixed"``: the caller's choice (:data:`DEFAULT_SEQUENCE`, e.g.
    ``slimc analyze``), else ``$SLIMC_DEFAULT_SEQUENCE``, else
    :data:`DYNAMIC_SEQUENCE_BY_DEFAULT`."""
    chosen = DEFAULT_SEQUENCE.get()
    if chosen is None:
        chosen = os.environ.get(SEQUENCE_ENV, "").strip().lower() or None
        if chosen is not None and chosen not in ("fixed", "dynamic"):
            raise UsageError(f"{SEQUENCE_ENV}={os.environ[SEQUENCE_ENV]!r} is neither 'fixed' "
                             "nor 'dynamic'.", hint=f"Set {SEQUENCE_ENV}=fixed (text models "
                             "take the example length, 128) or dynamic (1..the model's maximum "
                             "positions), or unset it.")
    if chosen is None:
        chosen = "dynamic" if DYNAMIC_SEQUENCE_BY_DEFAULT else "fixed"
    return chosen


def _sequence_overrides(overrides: dict[str, InputOverride], inputs: dict[str, torch.Tensor],
                        accepted: list[str], text_config,
                        module: torch.nn.Module | None = None) -> dict[str, InputOverride]:
    """Overrides with the ``[batch, sequence]`` inputs agreeing (see :func:`agree`); for a
    text model with no shape given and :func:`default_sequence` dynamic, a dynamic sequence
    length ``1..min(max positions, MAX_DEFAULT_SEQUENCE)``."""
    present = [n for n in SEQUENCE_INPUTS if n in inputs or n in overrides]
    if _dynamic_by_default(overrides, inputs):
        limit = min(max_positions(text_config, module) or 0, MAX_DEFAULT_SEQUENCE)
        if limit >= 2:
            seq = DimRange("seq", 1, limit)
            batch = int(inputs["input_ids"].shape[0])
            overrides = {**overrides, "input_ids": InputOverride(
                "input_ids", (batch, seq.example(1)), overrides.get(
                    "input_ids", InputOverride("input_ids", None, None)).dtype, (None, seq))}
    present = [n for n in present if n in accepted]
    limit = max_positions(text_config, module)
    for ov in overrides.values():
        seq = ov.ranges[1] if ov.ranges and len(ov.ranges) > 1 else None
        if ov.name in SEQUENCE_INPUTS and seq is not None and limit and seq.max > limit:
            raise UsageError(f"--input {ov.name}: a sequence of up to {seq.max} tokens is "
                             f"longer than the model's {limit} positions "
                             "(its position table).",
                             hint=f"Bound it at {limit}, e.g. --input {ov.name}="
                             f"{ov.shape[0]}x{seq.min}..{limit}:int64.")
    return agree(overrides, SEQUENCE_INPUTS, present)


def _dynamic_by_default(overrides: dict[str, InputOverride],
                        inputs: dict[str, torch.Tensor]) -> bool:
    """Whether the default dynamic sequence applies: a text model (its inputs are all token
    ids, masks, token types or positions), no ``--input`` shape, and the default asks for it."""
    names = set(inputs) | {n for n, ov in overrides.items() if ov.shape}
    return ("input_ids" in inputs and names <= set(SEQUENCE_INPUTS)
            and not any(ov.shape for ov in overrides.values())
            and default_sequence() == "dynamic")


def _default_inputs(config, text_config, accepted: list[str], vocab: int,
                    module: torch.nn.Module | None = None):
    max_pos = max_positions(text_config, module) or DEFAULT_SEQ_LEN
    seq = min(DEFAULT_SEQ_LEN, max_pos)
    inputs: dict[str, torch.Tensor] = {}
    if "input_ids" in accepted:
        inputs["input_ids"] = random_tensor("input_ids", (1, seq), torch.int64, high=vocab)
        if "attention_mask" in accepted:
            inputs["attention_mask"] = torch.ones(1, seq, dtype=torch.int64)
        if "token_type_ids" in accepted and int(getattr(text_config, "type_vocab_size", 0)
                                                   or 0) > 0:
            # BERT-style segment ids: a model that has a token-type table takes them.
            inputs["token_type_ids"] = torch.zeros(1, seq, dtype=torch.int64)
    if "input_features" in accepted and getattr(config, "num_mel_bins", None):
        frames = 2 * _dim(getattr(config, "max_source_positions", None), 1500)
        inputs["input_features"] = random_tensor(
            "input_features", (1, int(config.num_mel_bins), frames), torch.float32)
    if "decoder_input_ids" in accepted and inputs:
        dec_max = _dim(getattr(config, "max_target_positions", None), seq)
        inputs["decoder_input_ids"] = random_tensor("decoder_input_ids", (1, min(seq, dec_max)),
                                                    torch.int64, high=vocab)
    if "pixel_values" in accepted:
        vision = getattr(config, "vision_config", None) or config
        size = _dim(getattr(vision, "image_size", None), 224)
        channels = int(getattr(vision, "num_channels", 3) or 3)
        inputs["pixel_values"] = random_tensor("pixel_values", (1, channels, size, size),
                                               torch.float32)
    return inputs
