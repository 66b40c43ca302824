"""Blockwise indexer losses: equal to the references, without any [T, S] matrix per head.

The warm-up KL runs over blocks of Tc queries, with Tc chosen so that one block's attention logits
[B, Tc, H, S] stay under `chunk_elements`. Because the loss is a scalar, each block's gradients with
respect to q_idx, k_idx and weights are computed in the forward pass, right after its loss (as fused
linear-cross-entropy kernels do), by hand rather than by autograd. The backward pass only scales them.
So the attention target and the indexer logits of a block are computed once, in two buffers that
every block reuses, and peak memory follows the block size, not T * S. The sparse KL works on the
gathered [B, Tc, K] selection only, under non-reentrant activation checkpointing.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from dsa.ops._checks import check_attention_inputs, check_float, check_indexer_inputs, resolve_mask_args
from dsa.ops.masks import query_is_kept, visible_keys


def _block_kl(target: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Return per-row KL(target || softmax(scores)) over keep; [B, Tc, S'] -> [B, Tc]."""
    has_key = keep.any(dim=-1, keepdim=True)
    log_pred = torch.log_softmax(scores.masked_fill(~keep, float("-inf")).masked_fill(~has_key, 0.0), dim=-1)
    return (torch.xlogy(target, target) - target * log_pred.masked_fill(~keep, 0.0)).sum(dim=-1)


def head_mean_probs(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over heads of masked softmax: logits [B, Tc, HKV, G, S'], keep [B, Tc, S'] -> [B, Tc, S'].

    Rows without a visible key get all-zero probabilities. `logits` is overwritten with the per-head
    probabilities (the softmax runs in place, so a block needs no second buffer of its size).
    """
    bias = torch.zeros(keep.shape, dtype=logits.dtype, device=logits.device).masked_fill_(~keep, float("-inf"))
    logits.add_(bias[:, :, None, None, :])
    # A row of -inf gives NaN here: only rows without any visible key, which must be zeros.
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    logits.div_(logits.sum(dim=-1, keepdim=True))
    return logits.mean(dim=(2, 3)).nan_to_num_(0.0)


def grouped_logits(q_block: torch.Tensor, k_t: torch.Tensor, scale: float, storage: torch.Tensor | None = None) -> torch.Tensor:
    """Return attention logits [B, Tc, HKV, G, S'] (a permuted view) for q_block [B, Tc, H, D] and
    k_t [B, HKV, D, S'], with one matmul per KV head so no key tensor is broadcast over queries.

    storage: optional flat fp32 tensor of at least B * H * Tc * S' values that receives the logits. A
    blockwise pass reuses one across its blocks: a fresh tensor of this size per block (64 MiB at the
    default budget) goes back to the operating system when freed, and zeroing its pages again on the
    next block cost up to half of the warm-up loss's time at 8192 tokens on a busy 2-core CPU.
    """
    batch, width, heads, head_dim = q_block.shape
    kv_heads, keys = k_t.shape[1], k_t.shape[-1]
    groups = heads // kv_heads
    # [B, Tc, HKV, G, D] -> [B, HKV, Tc * G, D], scaled here: D values per row instead of S'
    grouped = (q_block.float() * scale).reshape(batch, width, kv_heads, groups, head_dim).permute(0, 2, 1, 3, 4)
    grouped = grouped.reshape(batch, kv_heads, width * groups, head_dim)
    out = None
    if storage is not None:
        out = storage[: batch * kv_heads * width * groups * keys].view(batch, kv_heads, width * groups, keys)
    # [B, HKV, Tc * G, D] @ [B, HKV, D, S'] -> [B, HKV, Tc, G, S'] -> [B, Tc, HKV, G, S']
    logits = torch.matmul(grouped, k_t, out=out)
    return logits.view(batch, kv_heads, width, groups, keys).permute(0, 2, 1, 3, 4)


def logits_storage(batch: int, heads: int, block: int, keys: int, device: torch.device) -> torch.Tensor:
    """Return the flat fp32 `storage` of `grouped_logits` for blocks of at most `block` queries."""
    return torch.empty(batch * heads * block * keys, dtype=torch.float32, device=device)


def _warmup_block(q_block, k_t, q_idx_block, k_idx_t, weights_block, keep, counted, scale, storage, need_grad):
    """Return (summed KL of the counted rows, grad q_idx [B, Tc, HI, DI], grad k_idx_t [B, DI, S'],
    grad weights [B, Tc, HI]) for one block, in fp32; a gradient not in `need_grad` is None.

    The gradients are written out rather than taken with autograd, so the per-head indexer logits
    [B, Tc * HI, S'] live in one buffer (`storage[1]`) that becomes their gradient in place. With
    I[t, s] = c * sum_h w[t, h] * relu(q_idx[t, h] . k_idx[s]), c = (HI * DI)^-1/2, and
    g[t, s] = softmax(I[t])[s] - target[t, s] on kept keys of counted rows (0 elsewhere):
    dL/dw[t, h] = c * sum_s g[t, s] * relu(.), and the logits' gradient is c * w[t, h] * g[t, s] where
    the logit is positive, from which q_idx and k_idx get theirs by two products.
    """
    batch, width, index_heads, index_dim = q_idx_block.shape
    keys = k_idx_t.shape[-1]
    with torch.no_grad():
        target = head_mean_probs(grouped_logits(q_block, k_t, scale, storage[0]), keep)
        # [B, Tc * HI, DI] @ [B, DI, S'] -> [B, Tc * HI, S'], then ReLU in place
        q_rows = q_idx_block.float().reshape(batch, width * index_heads, index_dim)
        index_logits = storage[1][: batch * width * index_heads * keys].view(batch, width * index_heads, keys)
        torch.bmm(q_rows, k_idx_t, out=index_logits).relu_()
        per_head = index_logits.view(batch, width, index_heads, keys)
        head_weights = weights_block.float() * (index_heads * index_dim) ** -0.5  # [B, Tc, HI]
        # [B, Tc, 1, HI] @ [B, Tc, HI, S'] -> [B, Tc, S']
        scores = torch.matmul(head_weights.unsqueeze(2), per_head).squeeze(2)
        has_key = keep.any(dim=-1, keepdim=True)
        log_pred = torch.log_softmax(scores.masked_fill_(~keep, float("-inf")).masked_fill_(~has_key, 0.0), dim=-1)
        rows = (torch.xlogy(target, target) - target * log_pred.masked_fill(~keep, 0.0)).sum(dim=-1)
        loss = (rows * counted).sum()
        # g: the KL's gradient with respect to the scores, zero outside kept keys and counted rows.
        grad_scores = log_pred.exp_().masked_fill_(~keep, 0.0).sub_(target).mul_(counted.unsqueeze(-1))
        grad_weights = None
        if need_grad[2]:
            # [B, Tc, HI, S'] @ [B, Tc, S', 1] -> [B, Tc, HI]
            grad_weights = torch.matmul(per_head, grad_scores.unsqueeze(-1)).squeeze(-1) * (index_heads * index_dim) ** -0.5
        if not (need_grad[0] or need_grad[1]):
            return loss, None, None, grad_weights
        # From here index_logits contains its own gradient: (logit > 0) * c * w[t, h] * g[t, s].
        per_head.sign_().mul_(head_weights.unsqueeze(-1)).mul_(grad_scores.unsqueeze(2))
        grad_q = None
        if need_grad[0]:
            # [B, Tc * HI, S'] @ [B, S', DI] -> [B, Tc, HI, DI]
            grad_q = torch.bmm(index_logits, k_idx_t.transpose(1, 2)).view(batch, width, index_heads, index_dim)
        grad_k = torch.bmm(q_rows.transpose(1, 2), index_logits) if need_grad[1] else None  # [B, DI, S']
        return loss, grad_q, grad_k, grad_weights


class _WarmupKL(torch.autograd.Function):
    """Blockwise warm-up KL whose forward pass also computes the input gradients (see module docstring)."""

    @staticmethod
    def forward(ctx, q_idx, k_idx, weights, q, k, scale, q_start, key_padding_mask, attention_mask, chunk_elements):  # type: ignore[override]
        batch, queries, heads = q.shape[0], q.shape[1], q.shape[2]
        keys = k.shape[1]
        block = max(1, chunk_elements // max(1, batch * heads * keys))
        need_grad = ctx.needs_input_grad[:3]
        k_t = k.float().permute(0, 2, 3, 1)  # [B, HKV, D, S]
        k_idx_t = k_idx.float().transpose(1, 2)  # [B, DI, S]
        grads = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) if need else None
                 for t, need in zip((q_idx, k_idx_t, weights), need_grad)]
        total = torch.zeros((), dtype=torch.float32, device=q.device)
        counted_total = 0
        width = min(block, queries)
        storage = (
            logits_storage(batch, heads, width, keys, q.device),
            logits_storage(batch, q_idx.shape[2], width, keys, q.device),
        )
        for start in range(0, queries, block):
            stop = min(start + block, queries)
            span = q_start + stop  # later keys are invisible to every query of the block
            q_positions = torch.arange(q_start + start, q_start + stop, device=q.device)
            padding = None if key_padding_mask is None else key_padding_mask[:, :span]
            rows_mask = None if attention_mask is None else attention_mask[:, start:stop, :span]
            keep = visible_keys(q_positions, span, padding, batch, rows_mask)
            counted = query_is_kept(q_positions, key_padding_mask, batch) & keep.any(dim=-1)
            block_loss, *block_grads = _warmup_block(
                q[:, start:stop], k_t[..., :span], q_idx[:, start:stop], k_idx_t[..., :span],
                weights[:, start:stop], keep, counted, scale, storage, need_grad,
            )
            for index, need in enumerate(need_grad):
                if need:
                    view = grads[index][:, start:stop] if index != 1 else grads[index][..., :span]
                    view.add_(block_grads[index])
            total += block_loss
            counted_total += int(counted.sum())
        denominator = max(counted_total, 1)
        ctx.save_for_backward(*[g / denominator if g is not None else torch.empty(0) for g in grads])
        ctx.dtypes = (q_idx.dtype, k_idx.dtype, weights.dtype)
        return total / denominator

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grad_q_idx, grad_k_idx_t, grad_weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        outputs = [
            (grad_q_idx * grad_loss).to(ctx.dtypes[0]) if needs[0] else None,
            (grad_k_idx_t * grad_loss).transpose(1, 2).to(ctx.dtypes[1]) if needs[1] else None,
            (grad_weights * grad_loss).to(ctx.dtypes[2]) if needs[2] else None,
        ]
        return (*outputs, None, None, None, None, None, None, None)


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
    batch, queries, keys = q.shape[0], q.shape[1], k.shape[1]
    q_start = resolve_mask_args(queries, keys, batch, q_start, key_padding_mask, attention_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _WarmupKL.apply(
        q_idx, k_idx, weights, q.detach(), k.detach(), scale, q_start, key_padding_mask, attention_mask, chunk_elements
    )


def _sparse_block(q_block, k_sel, q_idx_block, k_idx_sel, weights_block, valid, scale):
    batch, width, heads, head_dim = q_block.shape
    kv_heads = k_sel.shape[3]
    with torch.no_grad():
        grouped = q_block.float().view(batch, width, kv_heads, heads // kv_heads, head_dim)
        # [B, Tc, HKV, G, D] @ [B, Tc, HKV, D, K] -> [B, Tc, HKV, G, K]
        logits = torch.matmul(grouped, k_sel.float().permute(0, 1, 3, 4, 2)) * scale
        target = head_mean_probs(logits, valid)
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
