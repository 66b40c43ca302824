"""Readable references for the two indexer losses, built from full [B, H, T, S] matrices.

Warm-up (dense stage), for every kept query t with at least one visible key:

    p[t, :] = (1 / H) * sum_h softmax_s(scale * q[t, h] . k[s, h // G])     over visible keys s
    loss_t  = KL(p[t, :] || softmax_s(I[t, :]))                              over the same keys

Summing the H per-head distributions and L1-normalising equals their mean, since each sums to 1.
Sparse stage: the same with s restricted to the selected set S_t of indices[t].
Both return the mean of loss_t over the counted queries (0 when there are none). Gradients reach only
q_idx, k_idx and weights: the attention target is computed without grad.
"""

from __future__ import annotations

import torch

from dsa.ops._checks import check_attention_inputs, check_float, check_indexer_inputs, resolve_mask_args
from dsa.ops.indexer.naive import index_scores_reference
from dsa.ops.masks import query_is_kept, visible_keys
from dsa.ops.sparse_attention.naive import indices_to_mask


def _kl_rows(target: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Return KL(target || softmax(scores)) per row over `keep`; all [B, T, S] -> [B, T]."""
    has_key = keep.any(dim=-1, keepdim=True)
    log_pred = torch.log_softmax(scores.masked_fill(~keep, float("-inf")).masked_fill(~has_key, 0.0), dim=-1)
    terms = torch.xlogy(target, target) - target * log_pred.masked_fill(~keep, 0.0)
    return terms.sum(dim=-1)


def head_mean_probs_reference(q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """Return the mean over heads of softmax attention restricted to `keep` [B, T, S]: [B, T, S] fp32.

    Rows without a visible key get all-zero probabilities.
    """
    groups = q.shape[2] // k.shape[2]
    k_per_head = k.float().repeat_interleave(groups, dim=2)
    logits = torch.einsum("bthd,bshd->bhts", q.float(), k_per_head) * scale
    has_key = keep.any(dim=-1, keepdim=True).unsqueeze(1)
    logits = logits.masked_fill(~keep.unsqueeze(1), float("-inf")).masked_fill(~has_key, 0.0)
    return (torch.softmax(logits, dim=-1) * has_key).mean(dim=1)


def _mean_over(rows: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    total = (rows * counted).sum()
    return total / counted.sum().clamp_min(1)


def warmup_kl_reference(
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
    """Return the mean warm-up KL (scalar fp32) for attention q [B, T, H, D], k [B, S, HKV, D] and
    indexer q_idx [B, T, HI, DI], k_idx [B, S, DI], weights [B, T, HI].

    `chunk_elements` is accepted for signature parity with the blockwise version and ignored here.
    """
    check_float("q", q, 4)
    check_float("k", k, 4)
    check_indexer_inputs(q_idx, k_idx, weights)
    batch, queries, keys = q.shape[0], q.shape[1], k.shape[1]
    q_start = resolve_mask_args(queries, keys, batch, q_start, key_padding_mask, attention_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    q_positions = torch.arange(q_start, q_start + queries, device=q.device)
    keep = visible_keys(q_positions, keys, key_padding_mask, batch, attention_mask)
    with torch.no_grad():
        target = head_mean_probs_reference(q, k, keep, scale)
    rows = _kl_rows(target, index_scores_reference(q_idx, k_idx, weights), keep)
    counted = query_is_kept(q_positions, key_padding_mask, batch) & keep.any(dim=-1)
    return _mean_over(rows, counted)


def sparse_kl_reference(
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
    """Return the mean sparse-stage KL over the selected sets indices [B, T, K] (scalar fp32).

    Queries whose row of indices is all -1 are not counted. `chunk_size` is ignored here.
    """
    check_attention_inputs(q, k, k, indices)
    check_indexer_inputs(q_idx, k_idx, weights)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keep = indices_to_mask(indices, k.shape[1])
    with torch.no_grad():
        target = head_mean_probs_reference(q, k, keep, scale)
    rows = _kl_rows(target, index_scores_reference(q_idx, k_idx, weights), keep)
    return _mean_over(rows, keep.any(dim=-1))
