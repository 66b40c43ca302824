"""Blockwise indexer losses: equal to the references, without any [T, S] matrix per head.

The warm-up KL runs over blocks of Tc queries, with Tc chosen so that one block's attention logits
[B, Tc, H, S] stay under `chunk_elements`. Each block runs under non-reentrant activation
checkpointing, so the backward pass recomputes the block instead of keeping its [B, Tc, HI, S] indexer
logits alive: peak memory follows the block size, not T * S. The sparse KL works on the gathered
[B, Tc, K] selection only.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from dsa.ops._checks import check_attention_inputs, check_float, check_indexer_inputs, resolve_mask_args
from dsa.ops.indexer.torch import index_scores_chunk
from dsa.ops.masks import query_is_kept, visible_keys


def _block_kl(target: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Return per-row KL(target || softmax(scores)) over keep; [B, Tc, S'] -> [B, Tc]."""
    has_key = keep.any(dim=-1, keepdim=True)
    log_pred = torch.log_softmax(scores.masked_fill(~keep, float("-inf")).masked_fill(~has_key, 0.0), dim=-1)
    return (torch.xlogy(target, target) - target * log_pred.masked_fill(~keep, 0.0)).sum(dim=-1)


def _head_mean_probs(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over heads of masked softmax: logits [B, Tc, HKV, G, S'], keep [B, Tc, S'] -> [B, Tc, S']."""
    keep_heads = keep[:, :, None, None, :]
    has_key = keep_heads.any(dim=-1, keepdim=True)
    logits = logits.masked_fill(~keep_heads, float("-inf")).masked_fill(~has_key, 0.0)
    return (torch.softmax(logits, dim=-1) * has_key).mean(dim=(2, 3))


def grouped_logits(q_block: torch.Tensor, k_t: torch.Tensor, scale: float) -> torch.Tensor:
    """Return attention logits [B, Tc, HKV, G, S'] (a permuted view) for q_block [B, Tc, H, D] and
    k_t [B, HKV, D, S'], with one matmul per KV head so no key tensor is broadcast over queries."""
    batch, width, heads, head_dim = q_block.shape
    kv_heads = k_t.shape[1]
    groups = heads // kv_heads
    # [B, Tc, HKV, G, D] -> [B, HKV, Tc * G, D]
    grouped = q_block.float().reshape(batch, width, kv_heads, groups, head_dim).permute(0, 2, 1, 3, 4)
    grouped = grouped.reshape(batch, kv_heads, width * groups, head_dim)
    # [B, HKV, Tc * G, D] @ [B, HKV, D, S'] -> [B, HKV, Tc, G, S'] -> [B, Tc, HKV, G, S']
    logits = torch.matmul(grouped, k_t) * scale
    return logits.view(batch, kv_heads, width, groups, -1).permute(0, 2, 1, 3, 4)


def _warmup_block(q_block, k_t, q_idx_block, k_idx_t, weights_block, q_positions, padding, rows_mask, scale):
    batch, width, heads, head_dim = q_block.shape
    kv_heads = k_t.shape[1]
    # Built here rather than passed in, so checkpointing does not keep one [B, Tc, S'] mask per block.
    keep = visible_keys(q_positions, k_t.shape[-1], padding, batch, rows_mask)
    with torch.no_grad():
        logits = grouped_logits(q_block, k_t, scale)
        target = _head_mean_probs(logits, keep)
        del logits
    scores = index_scores_chunk(q_idx_block, k_idx_t, weights_block)
    return _block_kl(target, scores, keep)


def _has_visible_key(q_positions: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """Return [B, Tc] bool: True where a query at q_positions [Tc] sees at least one kept key."""
    if padding is None:
        return torch.ones(1, q_positions.numel(), dtype=torch.bool, device=q_positions.device)
    # The earliest kept key of each row must lie at or before the query.
    first_kept = torch.where(padding.any(dim=-1), padding.int().argmax(dim=-1), padding.shape[-1])
    return first_kept.unsqueeze(1) <= q_positions.unsqueeze(0)


def warmup_kl_blockwise(
    q: torch.Tensor,
    k: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    weights: torch.Tensor,
    scale: float | None = None,
    *,
    q_start: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Return the mean warm-up KL (scalar fp32); same contract as `warmup_kl_reference`."""
    check_float("q", q, 4)
    check_float("k", k, 4)
    check_indexer_inputs(q_idx, k_idx, weights)
    batch, queries, heads = q.shape[0], q.shape[1], q.shape[2]
    keys = k.shape[1]
    q_start = resolve_mask_args(queries, keys, batch, q_start, key_padding_mask, attention_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    block = max(1, chunk_elements // max(1, batch * heads * keys))

    k_t = k.detach().float().permute(0, 2, 3, 1)  # [B, HKV, D, S]
    k_idx_t = k_idx.float().transpose(1, 2)  # [B, DI, S], keeps grad to k_idx
    total = q_idx.new_zeros((), dtype=torch.float32)
    counted = 0
    for start in range(0, queries, block):
        stop = min(start + block, queries)
        q_positions = torch.arange(q_start + start, q_start + stop, device=q.device)
        span = q_start + stop  # later keys are invisible to every query of the block
        padding = None if key_padding_mask is None else key_padding_mask[:, :span]
        # A slice of the caller's mask is a view, so checkpointing keeps no copy of it.
        rows_mask = None if attention_mask is None else attention_mask[:, start:stop, :span]
        rows = checkpoint(
            _warmup_block,
            q[:, start:stop].detach(),
            k_t[..., :span],
            q_idx[:, start:stop],
            k_idx_t[..., :span],
            weights[:, start:stop],
            q_positions,
            padding,
            rows_mask,
            scale,
            use_reentrant=False,
        )
        if rows_mask is None:
            has_key = _has_visible_key(q_positions, padding)
        else:
            has_key = visible_keys(q_positions, span, padding, batch, rows_mask).any(dim=-1)
        rows_counted = query_is_kept(q_positions, key_padding_mask, batch) & has_key
        total = total + (rows * rows_counted).sum()
        counted += int(rows_counted.sum())
    return total / max(counted, 1)


def _sparse_block(q_block, k_sel, q_idx_block, k_idx_sel, weights_block, valid, scale):
    batch, width, heads, head_dim = q_block.shape
    kv_heads = k_sel.shape[3]
    with torch.no_grad():
        grouped = q_block.float().view(batch, width, kv_heads, heads // kv_heads, head_dim)
        # [B, Tc, HKV, G, D] @ [B, Tc, HKV, D, K] -> [B, Tc, HKV, G, K]
        logits = torch.matmul(grouped, k_sel.float().permute(0, 1, 3, 4, 2)) * scale
        target = _head_mean_probs(logits, valid)
    index_heads, index_dim = q_idx_block.shape[2], q_idx_block.shape[3]
    # [B, Tc, HI, DI] @ [B, Tc, DI, K] -> [B, Tc, HI, K], then the head-weighted sum -> [B, Tc, K]
    index_logits = torch.matmul(q_idx_block.float(), k_idx_sel.float().transpose(-1, -2)).relu()
    head_weights = weights_block.float() * (index_heads**-0.5 * index_dim**-0.5)
    scores = torch.matmul(head_weights.unsqueeze(2), index_logits).squeeze(2)
    return _block_kl(target, scores, valid)


def sparse_kl_blockwise(
    q: torch.Tensor,
    k: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    scale: float | None = None,
    *,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Return the mean sparse-stage KL (scalar fp32); same contract as `sparse_kl_reference`."""
    check_attention_inputs(q, k, k, indices)
    check_indexer_inputs(q_idx, k_idx, weights)
    batch, queries = q.shape[0], q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch_offsets = torch.arange(batch, device=q.device).view(-1, 1, 1) * k.shape[1]
    k_rows = k.detach().reshape(batch * k.shape[1], k.shape[2], k.shape[3])
    k_idx_rows = k_idx.reshape(batch * k_idx.shape[1], k_idx.shape[2])
    total = q_idx.new_zeros((), dtype=torch.float32)
    counted = 0
    for start in range(0, queries, chunk_size):
        stop = min(start + chunk_size, queries)
        idx = indices[:, start:stop]
        valid = idx >= 0
        flat = (idx.clamp_min(0) + batch_offsets).flatten()
        k_sel = k_rows.index_select(0, flat).view(*idx.shape, k.shape[2], k.shape[3])
        k_idx_sel = k_idx_rows.index_select(0, flat).view(*idx.shape, k_idx.shape[2])
        rows = checkpoint(
            _sparse_block,
            q[:, start:stop].detach(),
            k_sel,
            q_idx[:, start:stop],
            k_idx_sel,
            weights[:, start:stop],
            valid,
            scale,
            use_reentrant=False,
        )
        rows_counted = valid.any(dim=-1)
        total = total + (rows * rows_counted).sum()
        counted += int(rows_counted.sum())
    return total / max(counted, 1)
