"""A functional, exportable step around a Hugging Face causal LM with an explicit KV cache.

The cache lives outside the graph: each layer's keys and values are inputs of shape
``[1, kv_heads, max_len, head_dim]``. A step attends over ``cat(cache, new rows)`` with a mask
(cache slots at or after ``pos`` are empty; new rows are causal; sliding-window layers also
mask what is older than their window) and returns the logits of one position plus only the new
K/V rows, which the runtime writes into its cache at ``pos``. So no step copies or returns the
whole cache, and the model's own attention code (GQA, soft-capping, scaling) runs unchanged.
"""

from __future__ import annotations

import inspect

import torch

_NEG = torch.finfo(torch.float32).min


class RowCollectingCache:
    """Duck-typed ``transformers`` cache: hands each layer ``cat(cache, new)``, keeps ``new``."""

    is_compileable = False

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values
        self.new_keys: dict[int, torch.Tensor] = {}
        self.new_values: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.new_keys[layer_idx], self.new_values[layer_idx] = key_states, value_states
        k = torch.cat([self.keys[layer_idx].to(key_states.dtype), key_states], dim=2)
        v = torch.cat([self.values[layer_idx].to(value_states.dtype), value_states], dim=2)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.keys)


def cache_geometry(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a text config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(getattr(config, "num_hidden_layers", None) or config.n_layer)
    heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return layers, kv_heads, head_dim


def layer_windows(config) -> list[int | None]:
    """Per layer: its sliding window, or None for full attention."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = cache_geometry(config)[0]
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [int(window) if t == "sliding_attention" and window else None for t in types]
    if window and getattr(config, "use_sliding_window", True):
        return [int(window)] * layers
    return [None] * layers


class KVStep(torch.nn.Module):
    """``(input_ids[1,T], pos[1], last[1], *caches) -> (logits[1,V], *new_rows)``.

    ``pos`` is the absolute position of ``input_ids[0, 0]``; ``last`` the index (within T) of
    the token whose logits are returned (prompts are right-padded to a fixed length).
    ``caches`` are ``k0, v0, k1, v1, ...``; the outputs' rows are in the same order.
    """

    def __init__(self, model: torch.nn.Module, max_len: int) -> None:
        super().__init__()
        self.model = model
        self.max_len = max_len
        self.windows = layer_windows(model.config)
        accepted = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in accepted else "past_key_values"
        self.keep_arg = "logits_to_keep" if "logits_to_keep" in accepted else None
        base = getattr(model, "base_model", model)
        self.mask_dict = "causal_mask_mapping" in inspect.getsource(type(base).forward)

    def _mask(self, pos: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
        query = pos + torch.arange(length, dtype=torch.int64).view(length, 1)      # [T,1]
        cached = torch.arange(self.max_len, dtype=torch.int64).view(1, -1)         # [1,M]
        fresh = pos + torch.arange(length, dtype=torch.int64).view(1, length)      # [1,T]
        ok_cached = cached < pos
        ok_fresh = fresh <= query
        if window is not None:
            ok_cached = ok_cached & (query - cached < window)
            ok_fresh = ok_fresh & (query - fresh < window)
        ok = torch.cat([ok_cached.expand(length, -1), ok_fresh], dim=1)
        zero = torch.zeros((), dtype=torch.float32)
        return torch.where(ok, zero, torch.full((), _NEG)).view(1, 1, length, -1)

    def forward(self, input_ids: torch.Tensor, pos: torch.Tensor, last: torch.Tensor,
                *caches: torch.Tensor):
        length = input_ids.shape[1]
        cache = RowCollectingCache(list(caches[0::2]), list(caches[1::2]))
        full = self._mask(pos, length, None)
        if self.mask_dict:
            mask = {"full_attention": full}
            for window in {w for w in self.windows if w is not None}:
                mask["sliding_attention"] = self._mask(pos, length, window)
        elif len(set(self.windows)) == 1 and self.windows[0] is not None:
            mask = self._mask(pos, length, self.windows[0])  # every layer slides (Mistral)
        else:
            mask = full
        position_ids = (pos + torch.arange(length, dtype=torch.int64)).view(1, length)
        kwargs = {self.cache_arg: cache, "use_cache": True}
        if self.keep_arg:
            kwargs[self.keep_arg] = last
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        if self.keep_arg is None:
            logits = logits.index_select(1, last)
        rows = []
        for i in range(len(cache.keys)):
            rows += [cache.new_keys[i], cache.new_values[i]]
        return (logits.reshape(1, -1), *rows)


class PrefillDecode(torch.nn.Module):
    """Both entry points in one graph, so every pass sees (and rewrites) shared weights once.

    Outputs: the prefill step's outputs, then the decode step's.
    """

    def __init__(self, model: torch.nn.Module, max_len: int) -> None:
        super().__init__()
        self.step = KVStep(model, max_len)

    def forward(self, prompt_ids, prompt_pos, prompt_last, token, token_pos, *caches):
        prefill = self.step(prompt_ids, prompt_pos, prompt_last, *caches)
        decode = self.step(token, token_pos, torch.zeros_like(token_pos), *caches)
        return (*prefill, *decode)
