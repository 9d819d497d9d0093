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
        #: id of each ``cat(cache, new)`` handed out -> its parts (see :meth:`split`).
        self.parts: dict[int, tuple[torch.Tensor, ...]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.new_keys[layer_idx], self.new_values[layer_idx] = key_states, value_states
        if self.keys[layer_idx] is None:  # probing the geometry: no cache yet
            return key_states, value_states
        cached_k = self.keys[layer_idx].to(key_states.dtype)
        cached_v = self.values[layer_idx].to(value_states.dtype)
        k = torch.cat([cached_k, key_states], dim=2)
        v = torch.cat([cached_v, value_states], dim=2)
        self.parts[id(k)] = (k, v, cached_k, key_states, cached_v, value_states)
        return k, v

    def split(self, key, value) -> tuple[torch.Tensor, ...] | None:
        """``(cache_k, new_k, cache_v, new_v)`` if ``key``/``value`` are what :meth:`update`
        returned (the model passed them to attention unchanged), else None."""
        entry = self.parts.get(id(key))
        if entry is None or entry[0] is not key or entry[1] is not value:
            return None
        return entry[2:]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.keys)


#: Name of :func:`grouped_query_attention` in transformers' attention registry.
GROUPED_ATTENTION = "slimc_grouped_query"

#: The cache of the step being run or traced: attention asks it for the parts of ``cat(cache,
#: new rows)`` (:meth:`RowCollectingCache.split`).
_ACTIVE_CACHES: list[RowCollectingCache] = []

#: Query rows per KV head (its query heads x the step's tokens) up to which attention reads
#: the cache where it lies instead of attending over ``cat(cache, new rows)``: decode steps.
#: Prefill (128 tokens) keeps the concatenation, whose copy is small next to its matmuls.
IN_PLACE_ROWS = 32


def grouped_query_attention(module, query, key, value, attention_mask, scaling=None,
                            dropout=0.0, softcap=None, **kwargs):
    """Attention for grouped-query layers without ``repeat_kv``: the query heads sharing a KV
    head are folded into that head's rows, ``[B, kv_heads, groups * T, D]``, so each step
    multiplies against the ``kv_heads`` keys/values as they are in the cache.

    Why: with ``sdpa``/eager attention, ``torch.export`` captures ``repeat_kv`` (broadcast each
    KV head to its query heads, then transpose): per decode step and layer that materializes
    ``heads x (max_length + 1) x head_dim`` floats for K and V. On SmolLM2-135M (9 query heads, 3
    KV heads) that fused copy was 36% of an int4 decode step. Same arithmetic as transformers'
    eager attention (scale, optional soft-capping, additive mask, fp32 softmax).

    Decode steps (:data:`IN_PLACE_ROWS`) go further: see :func:`_attend_cache_in_place`.
    """
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, softcap=softcap, **kwargs)
    groups = query.shape[1] // key.shape[1]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    parts = _ACTIVE_CACHES[-1].split(key, value) if _ACTIVE_CACHES else None
    if parts is not None and groups * query.shape[2] <= IN_PLACE_ROWS:
        return _attend_cache_in_place(query, *parts, attention_mask, scale, softcap)
    if groups == 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, softcap=softcap, **kwargs)
    b, heads, t, d = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    scores = torch.matmul(query.reshape(b, kv_heads, groups * t, d), key.transpose(2, 3)) * scale
    if attention_mask is None and t > 1 and getattr(module, "is_causal", True):
        attention_mask = torch.ones(t, length, dtype=torch.bool).tril(length - t)[None, None]
    probs = _softmax(scores, attention_mask, softcap, groups, t).to(query.dtype)
    out = torch.matmul(probs, value).view(b, heads, t, d)
    return out.transpose(1, 2).contiguous(), None


def _softmax(scores, attention_mask, softcap, groups: int, t: int):
    """Soft-capping, additive mask and fp32 softmax of ``[B, kv_heads, groups * T, L]``."""
    b, kv_heads, _, length = scores.shape
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # True = attend (sdpa-style masks)
            attention_mask = torch.where(attention_mask, 0.0, _NEG).to(scores.dtype)
        scores = scores.reshape(b, kv_heads, groups, t, length) \
            + attention_mask[:, :, None, :, :length]
    return torch.softmax(scores.reshape(b, kv_heads, groups * t, length), dim=-1,
                         dtype=torch.float32)


def _attend_cache_in_place(query, cache_k, new_k, cache_v, new_v, attention_mask, scale,
                           softcap):
    """Attention of a few query rows over ``cache`` and the step's new rows, without
    concatenating them: scores are ``cache_k @ q^T`` (the cache as the matmul's row operand,
    read where it lies, row by row) next to ``new_k @ q^T``, and the output is
    ``probs[:, :M] @ cache_v + probs[:, M:] @ new_v``.

    Why: ``cat(cache, new rows)`` copies a layer's whole cache per step, and ``q @ K^T`` then
    transposes it (a strided copy): on SmolLM2-135M's int4 decode step those two kernels were
    ~40% of the time. Only the small score matrix is transposed here.
    """
    b, heads, t, d = query.shape
    kv_heads, cached = cache_k.shape[1], cache_k.shape[2]
    groups = heads // kv_heads
    q_t = (query.reshape(b, kv_heads, groups * t, d) * scale).transpose(2, 3)
    scores = torch.cat([torch.matmul(cache_k, q_t), torch.matmul(new_k, q_t)], dim=2)
    probs = _softmax(scores.transpose(2, 3), attention_mask, softcap, groups, t)
    probs = probs.to(query.dtype)
    out = torch.matmul(probs[..., :cached], cache_v) + torch.matmul(probs[..., cached:], new_v)
    return out.view(b, heads, t, d).transpose(1, 2).contiguous(), None


def use_grouped_attention(model: torch.nn.Module) -> None:
    """Switch ``model`` from ``sdpa`` to :func:`grouped_query_attention` where transformers
    lets its attention be swapped (models written against ``AttentionInterface``); others, and
    models set to ``eager`` on purpose, keep theirs."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" \
            or not getattr(model, "_can_set_attn_implementation", lambda: False)():
        return
    AttentionInterface.register(GROUPED_ATTENTION, grouped_query_attention)
    AttentionMaskInterface.register(GROUPED_ATTENTION, eager_mask)  # additive float masks
    model.set_attn_implementation(GROUPED_ATTENTION)


def cache_geometry(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a text config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(getattr(config, "num_hidden_layers", None) or config.n_layer)
    heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return layers, kv_heads, head_dim


def measured_geometry(model: torch.nn.Module) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) as the model's layers hand keys to the cache, from one
    1-token step with no cache. The config does not always say: Falcon's multi-query layers
    cache one KV head although ``num_kv_heads`` equals the query heads, and its new decoder
    architecture caches keys already broadcast to every query head."""
    layers = cache_geometry(model.config)[0]
    try:
        with torch.no_grad():
            out = KVStep(model, 0)(torch.zeros(1, 1, dtype=torch.int64), torch.tensor([0]),
                                   torch.tensor([0]), *[None] * (2 * layers))
    except Exception:  # noqa: BLE001 - the caller's probe with real caches reports it
        return cache_geometry(model.config)
    rows = out[1]
    if rows.dim() != 4 or rows.shape[0] != 1 or rows.shape[2] != 1:
        return cache_geometry(model.config)
    return layers, int(rows.shape[1]), int(rows.shape[3])


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
        use_grouped_attention(model)
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
        _ACTIVE_CACHES.append(cache)
        try:
            out = self.model(input_ids=input_ids, attention_mask=mask,
                             position_ids=position_ids, **kwargs)
        finally:
            _ACTIVE_CACHES.pop()
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
