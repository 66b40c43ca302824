"""Sparse attention in chunked PyTorch: gathers the K selected key/value rows of each query.

Work and memory scale with T * K instead of T * S: for a chunk of Tc queries the gathered keys and
values are [B, Tc, HKV, K, D] and the logits [B, Tc, HKV, G, K]. The backward pass recomputes the
chunk's probabilities from the saved log-sum-exp (as FlashAttention does), so autograd keeps only
q, k, v, indices, out and lse. Matmuls run in fp32; out and gradients return in the input dtype.
"""

from __future__ import annotations

import torch

from dsa.ops._checks import check_attention_inputs


def _row_view(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Return x [B, S, HKV, D] as rows [N, D] without a copy, and the row-id strides (batch, key, head).

    x may be contiguous or a transposed view of a [B, HKV, S, D] tensor (the Hugging Face cache
    layout); both are read in place, so a decode step never copies the cache.
    """
    _, keys, kv_heads, head_dim = x.shape
    if x.is_contiguous():
        return x.view(-1, head_dim), (keys * kv_heads, kv_heads, 1)
    heads_first = x.transpose(1, 2)
    if not heads_first.is_contiguous():
        heads_first = heads_first.contiguous()
    return heads_first.view(-1, head_dim), (kv_heads * keys, 1, keys)


def _row_ids(indices: torch.Tensor, strides: tuple[int, int, int], kv_heads: int) -> torch.Tensor:
    """Return row ids [B * Tc * HKV * K], ordered (b, t, n, k), for indices [B, Tc, K] without -1."""
    batch_stride, key_stride, head_stride = strides
    batch = torch.arange(indices.shape[0], device=indices.device).view(-1, 1, 1, 1) * batch_stride
    heads = torch.arange(kv_heads, device=indices.device).view(1, 1, -1, 1) * head_stride
    return (batch + indices.unsqueeze(2) * key_stride + heads).flatten()


def _gather(rows: torch.Tensor, ids: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Gather rows into fp32 [B, Tc, HKV, K, D], the layout the batched matmuls read without copies."""
    return rows.index_select(0, ids).view(shape).float()


def _crop_empty_tail(idx: torch.Tensor) -> torch.Tensor:
    """Drop trailing slots that are -1 in every row of the chunk [B, Tc, K]; they would gather key 0
    for nothing (the first K queries of a prefill see fewer than K keys)."""
    used = (idx >= 0).any(dim=0).any(dim=0)
    width = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    return idx if width == idx.shape[-1] else idx[..., :width]


def _masked_logits(q: torch.Tensor, k_sel: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Return masked logits [B, Tc, HKV, G, K] for q [B, Tc, HKV, G, D] and k_sel [B, Tc, HKV, K, D]."""
    logits = torch.matmul(q, k_sel.transpose(-1, -2)) * scale
    return logits.masked_fill(~valid[:, :, None, None, :], float("-inf"))


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, scale, chunk_size):  # type: ignore[override]
        batch, queries, heads, head_dim = q.shape
        kv_heads = k.shape[2]
        groups = heads // kv_heads
        k_rows, k_strides = _row_view(k)
        v_rows, v_strides = _row_view(v)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(batch, queries, heads, dtype=torch.float32, device=q.device)
        for start in range(0, queries, chunk_size):
            stop = min(start + chunk_size, queries)
            idx = _crop_empty_tail(indices[:, start:stop])
            valid = idx >= 0
            shape = (batch, stop - start, kv_heads, idx.shape[-1], head_dim)
            k_sel = _gather(k_rows, _row_ids(idx.clamp_min(0), k_strides, kv_heads), shape)
            v_sel = _gather(v_rows, _row_ids(idx.clamp_min(0), v_strides, kv_heads), shape)
            q_chunk = q[:, start:stop].float().reshape(batch, stop - start, kv_heads, groups, head_dim)
            logits = _masked_logits(q_chunk, k_sel, valid, scale)
            row_max = logits.amax(dim=-1, keepdim=True)
            row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            probs = torch.exp(logits - row_max)
            denom = probs.sum(dim=-1, keepdim=True)
            # [B, Tc, HKV, G, K] @ [B, Tc, HKV, K, D] -> [B, Tc, HKV, G, D]
            values = torch.matmul(probs, v_sel)
            chunk_out = torch.where(denom > 0, values / denom.clamp_min(1e-30), torch.zeros_like(values))
            out[:, start:stop] = chunk_out.reshape(batch, stop - start, heads, head_dim).to(q.dtype)
            # lse is +inf for an empty row, so exp(logit - lse) is 0 there in the backward pass.
            chunk_lse = torch.where(denom > 0, row_max + denom.log(), torch.full_like(denom, float("inf")))
            lse[:, start:stop] = chunk_lse.reshape(batch, stop - start, heads)
        ctx.save_for_backward(q, k, v, indices, out, lse)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):  # type: ignore[override]
        q, k, v, indices, out, lse = ctx.saved_tensors
        scale, chunk_size = ctx.scale, ctx.chunk_size
        batch, queries, heads, head_dim = q.shape
        keys, kv_heads = k.shape[1], k.shape[2]
        groups = heads // kv_heads
        k_rows, k_strides = _row_view(k)
        v_rows, v_strides = _row_view(v)
        grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        # Accumulated in fp32 as contiguous [B, S, HKV, D], viewed as rows of D.
        grad_k = torch.zeros(batch * keys * kv_heads, head_dim, dtype=torch.float32, device=q.device)
        grad_v = torch.zeros_like(grad_k)
        grad_strides = (keys * kv_heads, kv_heads, 1)
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        for start in range(0, queries, chunk_size):
            stop = min(start + chunk_size, queries)
            width = stop - start
            idx = _crop_empty_tail(indices[:, start:stop])
            valid = idx >= 0
            safe = idx.clamp_min(0)
            shape = (batch, width, kv_heads, idx.shape[-1], head_dim)
            k_sel = _gather(k_rows, _row_ids(safe, k_strides, kv_heads), shape)
            v_sel = _gather(v_rows, _row_ids(safe, v_strides, kv_heads), shape)
            grouped = (batch, width, kv_heads, groups, head_dim)
            q_chunk = q[:, start:stop].float().reshape(grouped)
            d_out = grad_out[:, start:stop].float().reshape(grouped)
            probs = torch.exp(_masked_logits(q_chunk, k_sel, valid, scale) - lse[:, start:stop].view(grouped[:-1]).unsqueeze(-1))
            # dV[s] += sum_g p[g, s] dO[g]: [B, Tc, HKV, K, G] @ [B, Tc, HKV, G, D] -> [B, Tc, HKV, K, D]
            d_v_sel = torch.matmul(probs.transpose(-1, -2), d_out)
            # dP = dO V^T, then dS = P * (dP - rowsum(dO * O)).
            d_probs = torch.matmul(d_out, v_sel.transpose(-1, -2))
            delta = (d_out * out[:, start:stop].float().reshape(grouped)).sum(dim=-1, keepdim=True)
            if grad_lse is not None:
                delta = delta - grad_lse[:, start:stop].float().view(grouped[:-1]).unsqueeze(-1)
            d_logits = probs * (d_probs - delta) * scale
            grad_q[:, start:stop] = torch.matmul(d_logits, k_sel).reshape(batch, width, heads, head_dim).to(q.dtype)
            d_k_sel = torch.matmul(d_logits.transpose(-1, -2), q_chunk)  # [B, Tc, HKV, K, D]
            # Empty slots point at key 0 with zero probability, so they add zeros there.
            grad_ids = _row_ids(safe, grad_strides, kv_heads)
            grad_k.index_add_(0, grad_ids, d_k_sel.reshape(-1, head_dim))
            grad_v.index_add_(0, grad_ids, d_v_sel.reshape(-1, head_dim))
        grad_k = grad_k.view(k.shape).to(k.dtype)
        grad_v = grad_v.view(v.shape).to(v.dtype)
        return grad_q, grad_k, grad_v, None, None, None


def sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    scale: float | None = None,
    *,
    chunk_size: int = 256,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Return out [B, T, H, D] (q's dtype), and with `return_lse` also lse [B, T, H] (fp32, +inf for
    empty rows), for q [B, T, H, D], k and v [B, S, HKV, D], indices [B, T, K].

    One index set per query serves all H heads; -1 slots are skipped and a row without valid
    indices returns 0. Decoding (T = 1) gathers K rows and touches nothing else of the cache.
    """
    check_attention_inputs(q, k, v, indices)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} is invalid; expected an integer >= 1.")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, lse = _SparseAttention.apply(q, k, v, indices, scale, chunk_size)
    return (out, lse) if return_lse else out
