"""The "dsa" attention function and mask registered with transformers, and the indexer pre-hook.

Flow for one converted layer and one forward call:

1. A forward pre-hook on the attention module reads the normalised hidden state, the position ids
   and the cache from the module's keyword arguments, runs the lightning indexer on the new tokens and
   appends their indexer keys to the cache (`Cache.update_indexer`). The results wait on the layer state.
2. The module computes q, k, v, applies RoPE, updates its KV cache and calls the attention function
   registered as "dsa" (below). In sparse mode that function selects the top-k keys per query and runs
   sparse attention; in warm-up mode it runs dense SDPA and the warm-up loss.

Layers without an indexer (sliding-window layers) and the dense mode run transformers' own SDPA
function with the same mask, so they stay exactly as the unconverted model computes them.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import DynamicIndexedLayer, DynamicLayer, StaticIndexedLayer, StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dsa.integrations.hf.state import LayerState
from dsa.ops.prefill import sparse_prefill_torch
from dsa.ops.sparse_attention import sparse_attention_torch
from dsa.ops.topk import select_topk_torch

ATTENTION_NAME = "dsa"


def dsa_mask(*args, **kwargs):
    """SDPA's boolean mask ([B, 1, T, S], True = attend), or None where SDPA's mask function leaves it
    out: no padding, and one query, or as many queries as keys, or an empty static cache.

    The attention function reads None as causal attention whose last query attends up to the last
    filled key, which is what each of those cases means. A materialised causal mask of a 16k-token prefill takes
    256 MiB (T * S bytes), which dense SDPA never allocates, and each block of the fused prefill would
    apply it.
    """
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register the "dsa" attention function and mask with transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, dsa_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, dsa_mask)


# ---- the indexer pre-hook and the indexer key cache ----------------------------------------------------


def _indexed_cache_layer(cache, layer_idx: int) -> DynamicIndexedLayer | StaticIndexedLayer:
    """Return the cache layer for `layer_idx`, turning a fresh `DynamicLayer` into a `DynamicIndexedLayer`
    and a fresh `StaticLayer` into a `StaticIndexedLayer`.

    `generate()` builds a plain `DynamicCache` (or a `StaticCache` with `cache_implementation="static"`).
    Swapping the layer class in place keeps the indexer keys inside the Hugging Face cache object, so
    beam-search reordering, cropping and batch selection move them together with the attention keys.
    """
    layers = cache.layers
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while len(layers) <= layer_idx:
        if replicate is None:
            raise ValueError(f"the cache has no layer {layer_idx} and cannot create one; pass a DynamicCache or a StaticCache.")
        layers.append(DynamicIndexedLayer() if len(layers) == layer_idx else replicate())
    layer = layers[layer_idx]
    if isinstance(layer, (DynamicIndexedLayer, StaticIndexedLayer)):
        return layer
    if type(layer) is DynamicLayer:
        indexed = DynamicIndexedLayer()
    elif type(layer) is StaticLayer:
        indexed = StaticIndexedLayer(max_cache_len=layer.max_cache_len)
    else:
        raise TypeError(
            f"DSA keeps its indexer keys in a DynamicCache or a StaticCache, but layer {layer_idx} of the cache is a "
            f"{type(layer).__name__}; use the default cache or cache_implementation=\"static\" with a converted model."
        )
    if layer.is_initialized and int(layer.get_seq_length()) > 0:
        raise ValueError(
            f"the cache already contains {int(layer.get_seq_length())} tokens for layer {layer_idx} that were computed "
            "without a DSA indexer; start from an empty cache after convert()."
        )
    indexed.__dict__.update(layer.__dict__)
    layers[layer_idx] = indexed
    return indexed


def indexer_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Run the layer's indexer on the attention block's normalised hidden state (see module docstring)."""
    state: LayerState = module.dsa_state
    state.indexer_inputs = None
    if state.runtime.mode == "dense" or state.layer_idx in state.runtime.config.dense_layers:
        return
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    batch, queries = hidden.shape[:2]

    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        past = int(cache.get_seq_length(state.layer_idx)) if cache is not None else 0
        position_ids = torch.arange(past, past + queries, device=hidden.device).unsqueeze(0)
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; DSA expects [B, T] positions.")
    position_ids = position_ids.expand(batch, queries)

    # The indexer learns only from its own loss: no gradient flows from it into the base model.
    q_idx, k_new, weights = module.indexer(hidden.detach(), position_ids)
    state.filled_keys = None
    if cache is not None:
        layer = _indexed_cache_layer(cache, state.layer_idx)
        if isinstance(layer, StaticIndexedLayer):
            # A static layer returns its whole preallocated buffer, whose first positions hold the tokens so far.
            state.filled_keys = int(layer.get_seq_length()) + queries
            if state.filled_keys > layer.max_cache_len:
                raise ValueError(
                    f"layer {state.layer_idx}: {state.filled_keys} tokens do not fit the static cache of "
                    f"max_cache_len={layer.max_cache_len}; build the StaticCache with a larger max_cache_len."
                )
        k_idx = layer.update_indexer(k_new.to(_cached_key_dtype(layer, k_new, state.runtime.config)))
    else:
        k_idx = k_new
    state.indexer_inputs = (q_idx, k_idx, weights)


def _cached_key_dtype(layer, k_new: torch.Tensor, config) -> torch.dtype:
    """Return the dtype of the indexer key cache: the dtype it already stores, else bf16 when the scores'
    product runs in bf16 without gradients (inference), else the new keys' own dtype."""
    if layer.is_indexer_initialized:
        return layer.indexer_keys.dtype
    if config.indexer_score_dtype == "bfloat16" and not torch.is_grad_enabled():
        return torch.bfloat16
    return k_new.dtype


# ---- the attention function ----------------------------------------------------------------------------


def _mask_rows(attention_mask: torch.Tensor | None, batch: int, queries: int, keys: int) -> torch.Tensor | None:
    """Turn whatever mask transformers passes into bool [B, T, S] (True = may attend), or None."""
    if attention_mask is None:
        return None
    mask = attention_mask
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; DSA supports one mask for all heads [B, 1, T, S].")
        mask = mask[:, 0]
    if mask.dtype != torch.bool:
        # Additive float masks (eager style) hold 0 where attention is allowed.
        mask = mask == 0
    if mask.dim() == 2:  # a [B, S] padding mask
        mask = mask.unsqueeze(1)
    mask = mask[..., -keys:] if mask.shape[-1] > keys else mask
    if mask.shape[-1] != keys or mask.shape[-2] not in (1, queries):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected rows [B, T={queries}, S={keys}].")
    return mask.expand(batch, queries, keys)


def _hides_no_key(runtime, attention_mask: torch.Tensor, rows: torch.Tensor) -> bool:
    """Return True when the decode mask rows [B, 1, S], taken from `attention_mask` as transformers passed
    it, allow every key, checking each mask tensor once per key count.

    Reading S booleans costs about 20 us at 32k keys, paid in every layer otherwise. The memo holds a weak
    reference, so a new mask at a freed mask's address is never mistaken for it, and the mask's version
    counter, so an in-place change is seen. Tensors without one (inference mode) are checked every time.
    """
    try:
        version = attention_mask._version
    except RuntimeError:
        return bool(rows.all())
    keys = rows.shape[-1]
    memo = runtime.visible_mask_memo
    if memo is not None and memo[0]() is attention_mask and memo[1:] == (version, keys):
        return True
    if not bool(rows.all()):
        return False
    runtime.visible_mask_memo = (weakref.ref(attention_mask), version, keys)
    return True


def _select(runtime, q, k, q_idx, k_idx, weights, scaling, mask_args) -> torch.Tensor:
    """Return the index sets [B, T, K]: the indexer's top-k, or the oracle's when evaluating it."""
    config = runtime.config
    if runtime.selection == "oracle":
        return runtime.backend.oracle_topk(q, k, config.top_k, scaling, chunk_elements=config.loss_chunk_elements, **mask_args)
    return runtime.backend.select_topk(
        q_idx, k_idx, weights, config.top_k,
        sink_tokens=config.sink_tokens, local_tokens=config.local_tokens, chunk_size=config.query_chunk_size,
        score_dtype=_score_dtype(config), **mask_args,
    )


def _score_dtype(config) -> torch.dtype:
    return torch.bfloat16 if config.indexer_score_dtype == "bfloat16" else torch.float32


RECALL_BLOCKS = 8
"""Blocks of consecutive query rows whose recall a sampled measurement averages (DSARuntime.recall_rows)."""


def _recall_blocks(queries: int, rows: int) -> list[tuple[int, int]]:
    """Return the query blocks [start, stop) a recall measurement covers. That is every query when `rows`
    is 0 or at least `queries`. Otherwise it is RECALL_BLOCKS blocks of rows / RECALL_BLOCKS queries (at
    least one), evenly spaced from the first query to the last, so that short and long contexts both count."""
    if rows <= 0 or rows >= queries:
        return [(0, queries)]
    size = max(1, rows // RECALL_BLOCKS)
    last = queries - size
    starts = sorted({round(i * last / (RECALL_BLOCKS - 1)) for i in range(RECALL_BLOCKS)})
    return [(start, start + size) for start in starts]


def _block_mask_args(mask_args: dict, start: int, stop: int) -> tuple[int, dict]:
    """Return (key span, mask arguments) for queries [start, stop). Keys past the block's last query are
    invisible to all of it, so the block attends the first q_start + stop keys at most."""
    q_start = mask_args["q_start"]
    span = q_start + stop
    padding, rows = mask_args["key_padding_mask"], mask_args["attention_mask"]
    return span, dict(
        q_start=q_start + start,
        key_padding_mask=None if padding is None else padding[:, :span],
        attention_mask=None if rows is None else rows[:, start:stop, :span],
    )


@torch.no_grad()
def _measure_recall(state, q, k, scaling, mask_args, indices=None, indexer_inputs=None) -> None:
    """Store in state.recall the dense attention mass the selection covers, averaged over the query rows
    of `_recall_blocks`. Pass the index sets [B, T, K] of every query, or the indexer inputs (q_idx, k_idx,
    weights), from which only the measured rows are selected."""
    runtime = state.runtime
    blocks = _recall_blocks(q.shape[1], runtime.recall_rows)
    recalls = []
    for start, stop in blocks:
        span, block_args = _block_mask_args(mask_args, start, stop)
        if indices is not None:
            block_indices = indices[:, start:stop]
        else:
            q_idx, k_idx, weights = indexer_inputs
            block_indices = _select(
                runtime, q[:, start:stop], k[:, :span], q_idx[:, start:stop], k_idx[:, :span], weights[:, start:stop],
                scaling, block_args,
            )
        recall = runtime.backend.attention_recall(
            q[:, start:stop], k[:, :span], block_indices, scaling, chunk_elements=runtime.config.loss_chunk_elements,
            **block_args,
        )
        recalls.append(recall)
    if len(blocks) == 1:
        state.recall = recalls[0]
    else:
        rows = torch.tensor([stop - start for start, stop in blocks], dtype=torch.float32, device=q.device)
        state.recall = (torch.stack(recalls) * rows).sum() / rows.sum()


def _fused_prefill_applies(runtime, queries: int, keys: int, *tensors: torch.Tensor) -> bool:
    """Return True when `sparse_prefill_torch` can replace selection + sparse attention: the PyTorch
    backend's own two operators (not replaced ones), the indexer's selection, more than one query,
    more keys than top_k, no recall to measure and no gradient to keep."""
    backend = runtime.backend
    if backend.select_topk is not select_topk_torch or backend.sparse_attention is not sparse_attention_torch:
        return False
    if runtime.selection != "indexer" or runtime.measure_recall:
        return False
    if queries == 1 or keys <= runtime.config.top_k:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _dense(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def dsa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Compute attention for query [B, H, T, D] and key, value [B, HKV, S, D], the cache included.

    Returns (out [B, T, H, D], None), the convention of transformers' attention functions."""
    state: LayerState | None = getattr(module, "dsa_state", None)
    if state is None or state.runtime.mode == "dense":
        return _dense(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    if state.layer_idx in state.runtime.config.dense_layers:
        state.keys_per_query = state.recall = None
        return _dense(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    if state.indexer_inputs is None:
        raise RuntimeError(
            f"layer {state.layer_idx}: the DSA indexer did not run before attention; the attention module must be "
            "called with keyword arguments (hidden_states=...) as transformers' decoder layers do."
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("DSA does not implement attention logit soft-capping; convert() should have rejected this model.")
    q_idx, k_idx, weights = state.indexer_inputs
    state.indexer_inputs = None
    passed_mask = attention_mask
    if state.filled_keys is not None and state.filled_keys < key.shape[2]:
        # A static cache passes its whole buffer, and only its first filled_keys positions contain tokens.
        filled = state.filled_keys
        key, value, k_idx = key[:, :, :filled], value[:, :, :filled], k_idx[:, :filled]
        if attention_mask is not None and attention_mask.shape[-1] > filled:
            attention_mask = attention_mask[..., :filled]
    runtime = state.runtime
    config = runtime.config
    batch, _, queries, _ = query.shape
    keys = key.shape[2]
    if k_idx.shape[1] != keys:
        raise RuntimeError(
            f"layer {state.layer_idx}: the indexer key cache contains {k_idx.shape[1]} tokens but the attention cache "
            f"contains {keys}; the cache was extended without the indexer. Start from an empty cache after convert()."
        )
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    rows = _mask_rows(attention_mask, batch, queries, keys)
    if rows is not None and queries == 1 and _hides_no_key(runtime, passed_mask, rows):
        # A decode step whose mask hides nothing: no mask lets the selection take its fastest path.
        rows = None
    # The last query may attend every earlier key, so its row is the key padding mask (used to rank sinks).
    padding = None if rows is None else rows[:, -1]
    # Views in the [B, T, H, D] / [B, S, HKV, D] layout of the operators; nothing is copied.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    q_start = keys - queries

    mask_args = dict(q_start=q_start, key_padding_mask=padding, attention_mask=rows)

    if runtime.mode == "warmup":
        out = _dense(module, query, key, value, attention_mask, dropout, scaling, kwargs)
        state.keys_per_query = None
        if torch.is_grad_enabled():
            state.loss = runtime.backend.warmup_kl(
                q.detach(), k.detach(), q_idx, k_idx, weights, scaling, chunk_elements=config.loss_chunk_elements, **mask_args
            )
        if runtime.measure_recall:
            _measure_recall(state, q, k, scaling, mask_args, indexer_inputs=(q_idx, k_idx, weights))
        return out

    if dropout:
        raise ValueError(f"DSA sparse attention does not implement attention dropout (got {dropout}); set attention_dropout=0.")
    if _fused_prefill_applies(runtime, queries, keys, q, k, v, q_idx, k_idx, weights):
        # Selection and attention run one block of queries at a time, so [B, T, K] is never allocated.
        fused_out, state.keys_per_query = sparse_prefill_torch(
            q, k, v, q_idx, k_idx, weights, config.top_k, scaling,
            sink_tokens=config.sink_tokens, local_tokens=config.local_tokens, chunk_size=config.query_chunk_size,
            score_dtype=_score_dtype(config), **mask_args,
        )
        return fused_out, None
    indices = _select(runtime, q, k, q_idx, k_idx, weights, scaling, mask_args)
    state.keys_per_query = (indices >= 0).sum(dim=-1)
    if runtime.measure_recall:
        _measure_recall(state, q, k, scaling, mask_args, indices=indices)
    if keys <= config.top_k:
        # Every query selected all of its visible keys, so sparse attention equals dense attention:
        # run SDPA, which gives bit-identical outputs to the unconverted model and is faster here.
        out = _dense(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    else:
        out = (
            runtime.backend.sparse_attention(q, k, v, indices, scaling, chunk_size=config.query_chunk_size),
            None,
        )
    if module.training and torch.is_grad_enabled():
        state.loss = runtime.backend.sparse_kl(
            q.detach(), k.detach(), q_idx, k_idx, weights, indices, scaling, chunk_size=config.query_chunk_size
        )
    return out
