"""Blockwise attention recall and oracle selection: equal to the references, in query blocks of at most
`chunk_elements` attention logits, computed without gradient."""

from __future__ import annotations

import torch

from dsa.ops._checks import check_float, resolve_mask_args
from dsa.ops.indexer_loss.torch import grouped_logits, head_mean_probs, logits_storage
from dsa.ops.masks import query_is_kept, visible_keys
from dsa.ops.topk.torch import _ascending_indices, _choose


def _head_mean_blocks(q, k, scale, q_start, key_padding_mask, attention_mask, chunk_elements):
    """Yield (start, stop, p [B, Tc, S'] fp32, visible [B, Tc, S'], counted [B, Tc]) per query block."""
    check_float("q", q, 4)
    check_float("k", k, 4)
    batch, queries, heads, head_dim = q.shape
    keys, kv_heads = k.shape[1], k.shape[2]
    q_start = resolve_mask_args(queries, keys, batch, q_start, key_padding_mask, attention_mask)
    scale = head_dim**-0.5 if scale is None else scale
    block = max(1, chunk_elements // max(1, batch * heads * keys))
    k_t = k.detach().float().permute(0, 2, 3, 1)  # [B, HKV, D, S]
    storage = logits_storage(batch, heads, min(block, queries), keys, q.device)
    for start in range(0, queries, block):
        stop = min(start + block, queries)
        span = q_start + stop
        q_positions = torch.arange(q_start + start, q_start + stop, device=q.device)
        padding = None if key_padding_mask is None else key_padding_mask[:, :span]
        rows_mask = None if attention_mask is None else attention_mask[:, start:stop, :span]
        visible = visible_keys(q_positions, span, padding, batch, rows_mask)
        logits = grouped_logits(q[:, start:stop].detach(), k_t[..., :span], scale, storage)
        probs = head_mean_probs(logits, visible)
        has_key = visible.any(dim=-1)
        counted = query_is_kept(q_positions, key_padding_mask, batch) & has_key
        yield start, stop, probs, visible, counted


@torch.no_grad()
def attention_recall_blockwise(
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
    total = torch.zeros((), dtype=torch.float32, device=q.device)
    counted_total = 0
    for start, stop, probs, _, counted in _head_mean_blocks(q, k, scale, q_start, key_padding_mask, attention_mask, chunk_elements):
        idx = indices[:, start:stop]
        # Indices beyond the block's key span cannot be valid for causal queries, so clamping is safe.
        gathered = probs.gather(-1, idx.clamp(0, probs.shape[-1] - 1))
        covered = torch.where(idx >= 0, gathered, 0.0).sum(dim=-1)
        total += (covered * counted).sum()
        counted_total += int(counted.sum())
    return total / max(counted_total, 1)


@torch.no_grad()
def oracle_topk_blockwise(
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
    """Return the oracle index sets [B, T, min(top_k, S)]; same contract as `oracle_topk_reference`."""
    batch, queries, keys = q.shape[0], q.shape[1], k.shape[1]
    width = min(top_k, keys)
    out = torch.empty(batch, queries, width, dtype=torch.int64, device=q.device)
    for start, stop, probs, visible, _ in _head_mean_blocks(q, k, scale, q_start, key_padding_mask, attention_mask, chunk_elements):
        chosen = _choose(probs, visible, None, width)
        out[:, start:stop] = _ascending_indices(chosen, width)
    return out
