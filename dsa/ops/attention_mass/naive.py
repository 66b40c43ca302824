"""Readable references for measurements on the dense attention distribution.

p[b, t, s] is the attention probability of query t on key s averaged over the H heads (the warm-up KL
target). The recall of an index set S_t is sum_{s in S_t} p[t, s]: the share of the dense attention mass
that sparse attention over S_t keeps. The oracle set is the top_k keys by p[t, :], the best recall any
indexer can reach at that top_k.
"""

from __future__ import annotations

import torch

from dsa.ops._checks import check_float, resolve_mask_args
from dsa.ops.indexer_loss.naive import head_mean_probs_reference
from dsa.ops.masks import query_is_kept, visible_keys


def head_mean_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | None = None,
    *,
    q_start: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return p [B, T, S] (fp32, zero on invisible keys) and the counted-query mask [B, T]."""
    check_float("q", q, 4)
    check_float("k", k, 4)
    batch, queries, heads, head_dim = q.shape
    keys = k.shape[1]
    q_start = resolve_mask_args(queries, keys, batch, q_start, key_padding_mask, attention_mask)
    scale = head_dim**-0.5 if scale is None else scale
    q_positions = torch.arange(q_start, q_start + queries, device=q.device)
    keep = visible_keys(q_positions, keys, key_padding_mask, batch, attention_mask)
    probs = head_mean_probs_reference(q, k, keep, scale)
    has_key = keep.any(dim=-1)
    counted = query_is_kept(q_positions, key_padding_mask, batch) & has_key
    return probs, counted


def attention_recall_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    indices: torch.Tensor,
    scale: float | None = None,
    *,
    q_start: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Return the mean over counted queries of the dense attention mass inside indices [B, T, K] (scalar)."""
    probs, counted = head_mean_attention_reference(
        q, k, scale, q_start=q_start, key_padding_mask=key_padding_mask, attention_mask=attention_mask
    )
    covered = torch.where(indices >= 0, probs.gather(-1, indices.clamp_min(0)), 0.0).sum(dim=-1)
    return (covered * counted).sum() / counted.sum().clamp_min(1)


def oracle_topk_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    top_k: int,
    scale: float | None = None,
    *,
    q_start: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Return the oracle index sets [B, T, min(top_k, S)]: per query, the visible keys with the largest
    head-mean attention probability, ascending, -1 in empty slots, ties to the lower index."""
    probs, _ = head_mean_attention_reference(
        q, k, scale, q_start=q_start, key_padding_mask=key_padding_mask, attention_mask=attention_mask
    )
    batch, queries, keys = probs.shape
    q_start = keys - queries if q_start is None else q_start
    q_positions = torch.arange(q_start, q_start + queries, device=q.device)
    visible = visible_keys(q_positions, keys, key_padding_mask, batch, attention_mask)
    width = min(top_k, keys)
    indices = torch.full((batch, queries, width), -1, dtype=torch.int64, device=q.device)
    for b in range(batch):
        for t in range(queries):
            candidates = visible[b, t].nonzero().flatten().tolist()
            row = probs[b, t].tolist()
            chosen = sorted(sorted(candidates, key=lambda s: (-row[s], s))[:width])
            indices[b, t, : len(chosen)] = torch.tensor(chosen, dtype=torch.int64)
    return indices
