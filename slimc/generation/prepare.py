"""Turn a loaded Hugging Face causal LM into the combined prefill + decode module to capture.

Also collects what the runtime needs to drive the artifact (cache geometry, chunk length, stop
tokens), which goes into ``manifest.json`` under ``generation``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from slimc.calibration import CalibrationData, load_calibration
from slimc.errors import UsageError
from slimc.generation.wrapper import PrefillDecode, layer_windows, measured_geometry
from slimc.loaders.base import LoadedModel

#: Cache length when the user does not choose one (capped by the model's maximum positions).
DEFAULT_MAX_LENGTH = 512
#: Tokens per prefill call when the user does not choose (prompts are processed in chunks).
DEFAULT_PREFILL_LENGTH = 128

PREFILL_INPUTS = ("prompt_ids", "prompt_pos", "prompt_last")
DECODE_INPUTS = ("token", "token_pos")


def _max_positions(config) -> int | None:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None


def stop_token_ids(model_dir: str | None, config) -> list[int]:
    """``eos_token_id`` from generation_config.json, else from config.json (int or list)."""
    eos = None
    if model_dir and (Path(model_dir) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def prepare_generation(loaded: LoadedModel, max_length: int | None,
                       prefill_length: int | None) -> tuple[LoadedModel, dict[str, Any]]:
    """Wrap ``loaded`` for capture; returns it and the manifest's ``generation`` section."""
    module = loaded.module
    if module is None or not hasattr(module, "generate") or not hasattr(module, "config") \
            or loaded.kind != "huggingface":
        raise UsageError(f"--generate needs a Hugging Face causal language model directory; "
                         f"{loaded.name!r} is not one.",
                         hint="Point slimc at a folder with config.json whose architecture is "
                         "a *ForCausalLM / *LMHeadModel, or drop --generate.")
    if getattr(module.config, "is_encoder_decoder", False):
        raise UsageError(f"{loaded.name!r} is an encoder-decoder model; --generate supports "
                         "decoder-only causal LMs.", hint="Compile it without --generate.")
    limit = _max_positions(module.config)
    max_length = max_length or min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)
    if limit and max_length > limit:
        raise UsageError(f"--max-length {max_length} exceeds the model's maximum positions "
                         f"({limit}).", hint=f"Use --max-length {limit} or less.")
    prefill_length = prefill_length or min(DEFAULT_PREFILL_LENGTH, max(1, max_length // 2))
    if not 1 <= prefill_length < max_length:
        raise UsageError(f"--prefill-length {prefill_length} must be at least 1 and below "
                         f"--max-length {max_length}.",
                         hint="Prompts longer than the prefill length are fed in chunks.")
    layers, kv_heads, head_dim = measured_geometry(module)
    combined = PrefillDecode(module, max_length).eval()
    probe = torch.zeros(1, kv_heads, max_length, head_dim)
    with torch.no_grad():
        out = combined.step(torch.zeros(1, 1, dtype=torch.int64), torch.tensor([0]),
                            torch.tensor([0]), *[probe] * (2 * layers))
    if len(out) != 1 + 2 * layers or tuple(out[1].shape) != (1, kv_heads, 1, head_dim):
        raise UsageError(f"slimc cannot drive the attention cache of "
                         f"{type(module).__name__}: its layers did not report keys/values of "
                         f"shape [1, {kv_heads}, T, {head_dim}].",
                         hint="Compile it without --generate (a fixed-length forward pass).")
    vocab = int(out[0].shape[-1])
    # Deterministic, non-trivial example inputs: a prompt placed mid-cache, random cache rows.
    gen = torch.Generator().manual_seed(0)
    offset = min(2, max_length - prefill_length - 1)
    inputs: dict[str, torch.Tensor] = {
        "prompt_ids": torch.randint(0, vocab, (1, prefill_length), generator=gen),
        "prompt_pos": torch.tensor([offset]),
        "prompt_last": torch.tensor([prefill_length - 1]),
        "token": torch.randint(0, vocab, (1, 1), generator=gen),
        "token_pos": torch.tensor([offset + prefill_length]),
    }
    for i in range(layers):
        for kind in ("k", "v"):
            inputs[f"cache_{kind}{i}"] = 0.5 * torch.randn(1, kv_heads, max_length, head_dim,
                                                           generator=gen)
    cache_names = [n for n in inputs if n.startswith("cache_")]
    spec = {
        "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
        "max_length": max_length, "prefill_length": prefill_length, "vocab": vocab,
        "kv_cache_bytes": 2 * layers * kv_heads * max_length * head_dim * 4,
        "kv_cache_dtype": "float32",
        "sliding_windows": sorted({w for w in layer_windows(module.config) if w}),
        "stop_ids": stop_token_ids(loaded.extra.get("tokenizer") or loaded.source,
                                   module.config),
        "entry_points": {"prefill": [*PREFILL_INPUTS, *cache_names],
                         "decode": [*DECODE_INPUTS, *cache_names]},
    }
    wrapped = replace(loaded, module=combined, example_inputs=inputs, as_kwargs=False,
                      extra={**loaded.extra, "task": "generate"})
    return wrapped, spec


def generation_calibration(path, template: dict[str, torch.Tensor], *, step,
                           model_dir=None, max_batches: int = 4) -> CalibrationData:
    """``--calib`` data for a generation graph: both of its steps see real text.

    The text (or token ``.npy``) is cut into windows of ``prefill_length + 1`` tokens. Each
    batch's prefill half gets the first ``prefill_length`` tokens at position 0; its decode half
    gets the next token at position ``prefill_length``, with the cache holding the keys/values
    that ``step`` (the model, in PyTorch) computed for the window, so GPTQ/AWQ statistics of
    every layer come from real activations of both entry points.
    """
    prefill = int(template["prompt_ids"].shape[1])
    data = load_calibration(path, {"input_ids": torch.zeros(1, prefill + 1, dtype=torch.int64)},
                            model_dir=model_dir, max_batches=max_batches)
    names = [n for n in template if n.startswith("cache_")]
    batches = []
    for source in data.batches:
        ids = source["input_ids"]
        caches = [torch.zeros_like(template[n]) for n in names]
        with torch.no_grad():
            out = step(ids[:, :prefill], torch.tensor([0]), torch.tensor([prefill - 1]), *caches)
        for cache, rows in zip(caches, out[1:], strict=True):
            cache[:, :, :prefill] = rows
        batch = {"prompt_ids": ids[:, :prefill], "prompt_pos": torch.tensor([0]),
                 "prompt_last": torch.tensor([prefill - 1]), "token": ids[:, prefill:],
                 "token_pos": torch.tensor([prefill]), **dict(zip(names, caches, strict=True))}
        batches.append({n: batch[n] for n in template})
    return replace(data, batches=batches)


def entry_plan(spec: dict[str, Any], input_names: list[str]) -> dict[str, tuple[list, list]]:
    """name -> (indices of the combined graph's inputs, indices of its outputs)."""
    per_step = 1 + 2 * spec["layers"]
    return {
        "prefill": ([input_names.index(n) for n in spec["entry_points"]["prefill"]],
                    list(range(per_step))),
        "decode": ([input_names.index(n) for n in spec["entry_points"]["decode"]],
                   list(range(per_step, 2 * per_step))),
    }
