"""Visibility masks in key-position space, shared by selection, the oracles and the losses.

Query t of a block of T queries sits at key position q_start + t (q_start = S - T when the queries are
the last T tokens of the cache) and sees key s when s <= q_start + t and the padding mask keeps s.
"""

from __future__ import annotations

import torch


def visible_keys(
    q_positions: torch.Tensor,
    keys: int,
    key_padding_mask: torch.Tensor | None,
    batch: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return visibility [B, Tc, S] (bool) for queries at key positions q_positions [Tc].

    attention_mask: optional [B, Tc, S] bool rows of an extra mask (True = may attend), ANDed in.
    """
    key_positions = torch.arange(keys, device=q_positions.device)
    causal = key_positions.unsqueeze(0) <= q_positions.unsqueeze(1)  # [Tc, S]
    visible = causal.unsqueeze(0)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.unsqueeze(1)
    if attention_mask is not None:
        visible = visible & attention_mask
    return visible.expand(batch, -1, -1)


def query_is_kept(
    q_positions: torch.Tensor, key_padding_mask: torch.Tensor | None, batch: int
) -> torch.Tensor:
    """Return [B, Tc] bool: False where the query token itself is padding."""
    if key_padding_mask is None:
        return torch.ones(batch, q_positions.numel(), dtype=torch.bool, device=q_positions.device)
    return key_padding_mask[:, q_positions]


def forced_keys(
    visible: torch.Tensor,
    q_positions: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    sink_tokens: int,
    local_tokens: int,
) -> torch.Tensor | None:
    """Return [B, Tc, S] bool of keys always selected (first `sink_tokens` and last `local_tokens`
    visible keys of each query), or None when both are 0."""
    if sink_tokens == 0 and local_tokens == 0:
        return None
    batch, _, keys = visible.shape
    if key_padding_mask is None:
        kept = torch.ones(batch, keys, dtype=torch.int64, device=visible.device)
    else:
        kept = key_padding_mask.to(torch.int64)
    # rank[b, s]: how many kept keys lie at positions <= s (1 for the first kept key).
    rank = kept.cumsum(dim=-1)
    forced = torch.zeros_like(visible)
    if sink_tokens:
        forced |= visible & (rank <= sink_tokens).unsqueeze(1)
    if local_tokens:
        query_rank = rank[:, q_positions].unsqueeze(-1)  # [B, Tc, 1]
        forced |= visible & (query_rank - rank.unsqueeze(1) < local_tokens)
    return forced
