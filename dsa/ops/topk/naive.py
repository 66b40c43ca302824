"""Readable reference for top-k key selection, one query row at a time.

Rule: each query keeps the min(top_k, visible keys) visible keys with the highest index scores, where
forced keys (sinks and local window) rank above every score and equal scores keep the lower key index.
Returned indices [B, T, K] list a row's keys in ascending order, then -1 in unused slots,
with K = min(top_k, S).
"""

from __future__ import annotations

import torch

from dsa.ops._checks import check_indexer_inputs, resolve_mask_args
from dsa.ops.indexer.naive import index_scores_reference
from dsa.ops.masks import forced_keys, visible_keys


def select_topk_reference(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    weights: torch.Tensor,
    top_k: int,
    *,
    q_start: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    sink_tokens: int = 0,
    local_tokens: int = 0,
    chunk_size: int = 256,
    score_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return indices [B, T, K] (int64) for q_idx [B, T, HI, DI], k_idx [B, S, DI], weights [B, T, HI].

    key_padding_mask [B, S] and attention_mask [B, T, S] (bool, True = keep) restrict the causal
    visibility further; sink and local tokens count kept keys only. `score_dtype` is the dtype of the
    scores' q . k product (`index_scores_reference`). `chunk_size` is accepted for signature parity with
    the fast path and ignored here.
    """
    check_indexer_inputs(q_idx, k_idx, weights)
    check_selection_args(top_k, sink_tokens, local_tokens)
    batch, queries, keys = q_idx.shape[0], q_idx.shape[1], k_idx.shape[1]
    q_start = resolve_mask_args(queries, keys, batch, q_start, key_padding_mask, attention_mask)

    scores = index_scores_reference(q_idx, k_idx, weights, score_dtype)  # [B, T, S]
    q_positions = torch.arange(q_start, q_start + queries, device=q_idx.device)
    visible = visible_keys(q_positions, keys, key_padding_mask, batch, attention_mask)
    forced = forced_keys(visible, q_positions, key_padding_mask, sink_tokens, local_tokens)
    width = min(top_k, keys)
    indices = torch.full((batch, queries, width), -1, dtype=torch.int64, device=q_idx.device)
    for b in range(batch):
        for t in range(queries):
            candidates = visible[b, t].nonzero().flatten().tolist()
            is_forced = forced[b, t].tolist() if forced is not None else [False] * keys
            row = scores[b, t].tolist()
            ranked = sorted(candidates, key=lambda s: (not is_forced[s], -row[s], s))
            chosen = sorted(ranked[:width])
            indices[b, t, : len(chosen)] = torch.tensor(chosen, dtype=torch.int64)
    return indices


def check_selection_args(top_k: int, sink_tokens: int, local_tokens: int) -> None:
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} is invalid; expected an integer >= 1.")
    if sink_tokens < 0 or local_tokens < 0 or sink_tokens + local_tokens > top_k:
        raise ValueError(
            f"sink_tokens={sink_tokens}, local_tokens={local_tokens} are invalid for top_k={top_k}; "
            "expected non-negative values whose sum is at most top_k."
        )
