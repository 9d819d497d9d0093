"""Sentence-transformers pooling compiled into the artifact.

A model directory saved by sentence-transformers declares, in ``modules.json``, what turns token
states into the sentence embedding users want: a ``Pooling`` module (``1_Pooling/config.json``:
CLS token, mean, max, mean/sqrt(length) or last token, over the tokens the attention mask keeps)
and optionally ``Normalize`` (unit L2 norm). :class:`SentenceEncoder` wraps the transformer with
exactly that computation, so the artifact returns ``sentence_embedding`` and, as a second
output, the token states it was pooled from (``last_hidden_state``, as the transformer
names them; sentence-transformers calls them ``token_embeddings``).

The pooling is written here in a few torch ops (as sentence-transformers computes it) rather than
by tracing sentence-transformers' modules, which pass dicts and Python ints through ``forward``
and are not a dependency of slimc. A directory with modules slimc cannot compile (``Dense``,
``weightedmean`` pooling, ...) keeps the plain transformer outputs, and the manifest says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

#: ``pooling_mode_*`` flags of older configs, in the order sentence-transformers concatenates.
_LEGACY_FLAGS = (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                 ("pooling_mode_mean_tokens", "mean"),
                 ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
                 ("pooling_mode_weightedmean_tokens", "weightedmean"),
                 ("pooling_mode_lasttoken", "lasttoken"))
SUPPORTED_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "lasttoken")
_TRANSFORMER, _POOLING, _NORMALIZE = ("models.Transformer", "models.Pooling", "models.Normalize")


@dataclass(frozen=True)
class PoolingSpec:
    """What ``modules.json`` asks for after the transformer."""

    modes: tuple[str, ...]
    normalize: bool
    max_seq_length: int | None = None

    def describe(self) -> str:
        return "+".join(self.modes) + (", normalized" if self.normalize else "")


def read_pooling(path: Path) -> tuple[PoolingSpec | None, str | None]:
    """The pooling a sentence-transformers directory declares, or ``(None, reason)``.

    ``reason`` is None when the directory simply is not a sentence-transformers model.
    """
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None, None
    try:
        modules = json.loads(modules_file.read_text())
        kinds = [(m["type"], m.get("path", "")) for m in modules]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return None, f"modules.json is not readable ({exc})"
    if not kinds or not kinds[0][0].endswith(_TRANSFORMER) or kinds[0][1] not in ("", "."):
        return None, "modules.json does not start with the Transformer in this directory"
    modes: tuple[str, ...] = ()
    normalize = False
    for kind, sub in kinds[1:]:
        if kind.endswith(_POOLING) and not modes:
            modes = _pooling_modes(path / sub / "config.json")
        elif kind.endswith(_NORMALIZE) and modes and not normalize:
            normalize = True
        else:
            return None, f"module {kind} is not compiled by slimc"
    if not modes:
        return None, "modules.json declares no Pooling module"
    unsupported = [m for m in modes if m not in SUPPORTED_MODES]
    if unsupported:
        return None, f"pooling mode {', '.join(unsupported)} is not compiled by slimc"
    return PoolingSpec(modes, normalize, _max_seq_length(path)), None


def _pooling_modes(config_file: Path) -> tuple[str, ...]:
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError):
        return ()
    mode = config.get("pooling_mode")
    if isinstance(mode, str):
        return (mode,)
    if isinstance(mode, list):
        return tuple(mode)
    return tuple(name for flag, name in _LEGACY_FLAGS if config.get(flag))


def _max_seq_length(path: Path) -> int | None:
    try:
        value = json.loads((path / "sentence_bert_config.json").read_text()).get(
            "max_seq_length")
    except (OSError, json.JSONDecodeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


class SentenceEncoder(torch.nn.Module):
    """``transformer`` followed by the declared pooling (and normalisation).

    Returns ``{"sentence_embedding": [batch, dim * modes], "last_hidden_state": [batch, seq,
    dim]}``. The mask defaults to all ones, as in sentence-transformers.
    """

    def __init__(self, transformer: torch.nn.Module, spec: PoolingSpec) -> None:
        super().__init__()
        self.transformer = transformer
        self.modes = spec.modes
        self.normalize = spec.normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        extra = {k: v for k, v in (("token_type_ids", token_type_ids),
                                   ("position_ids", position_ids)) if v is not None}
        tokens = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                  **extra)[0]
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        pooled = torch.cat([pool(tokens, mask, mode) for mode in self.modes], dim=-1)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return {"sentence_embedding": pooled, "last_hidden_state": tokens}


def pool(tokens: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One sentence-transformers pooling mode over the tokens ``mask`` keeps."""
    keep = mask.unsqueeze(-1).to(tokens.dtype)
    if mode in ("mean", "mean_sqrt_len_tokens"):
        total = (tokens * keep).sum(dim=1)
        count = torch.clamp(keep.sum(dim=1), min=1e-9)
        return total / (count if mode == "mean" else torch.sqrt(count))
    if mode == "max":
        return tokens.masked_fill(keep == 0, float("-inf")).max(dim=1).values
    flags = mask.to(torch.int32)
    if mode == "cls":  # the first kept token (left padding allowed)
        index = flags.argmax(dim=1)
    else:  # lasttoken: the last kept token
        index = tokens.shape[1] - 1 - flags.flip(1).argmax(dim=1)
    gather = index.view(-1, 1, 1).expand(-1, 1, tokens.shape[-1])
    return torch.gather(tokens, 1, gather).squeeze(1)
