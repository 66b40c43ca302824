"""Sparse attention in chunked PyTorch: gathers the K selected key/value rows of each query.

Work and memory scale with T * K instead of T * S: for a chunk of Tc queries the gathered keys and
values are [B, Tc, K, HKV, D] and the logits [B, Tc, HKV, G, K]. The backward pass recomputes the
chunk's probabilities from the saved log-sum-exp (as FlashAttention does), so autograd keeps only
q, k, v, indices, out and lse. Matmuls run in fp32; out and gradients return in the input dtype.
"""

from __future__ import annotations

import torch

from dsa.ops._checks import check_attention_inputs


def _gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather x [B, S, HKV, D] at indices [B, Tc, K] (no -1 left) into fp32 [B, Tc, K, HKV, D].

    x may be contiguous or a transposed view of a [B, HKV, S, D] tensor (the Hugging Face cache
    layout); both are read in place, so a decode step never copies the cache.
    """
    batch, keys, kv_heads, head_dim = x.shape
    shape = (*indices.shape, kv_heads, head_dim)
    if x.is_contiguous():
        offsets = torch.arange(batch, device=x.device).view(-1, 1, 1) * keys
        rows = x.view(batch * keys, kv_heads * head_dim).index_select(0, (indices + offsets).flatten())
        return rows.view(shape).float()
    heads_first = x.transpose(1, 2)
    if not heads_first.is_contiguous():
        heads_first = heads_first.contiguous()
    # Row of (b, n, s) in the flattened [B * HKV * S, D] view is (b * HKV + n) * S + s.
    bases = (torch.arange(batch * kv_heads, device=x.device) * keys).view(batch, 1, 1, kv_heads)
    rows = heads_first.reshape(-1, head_dim).index_select(0, (indices.unsqueeze(-1) + bases).flatten())
    return rows.view(shape).float()


def _flat_indices(indices: torch.Tensor, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return row ids into a contiguous [B * S] key axis (empty slots point at row 0) and the valid mask."""
    valid = indices >= 0
    offsets = torch.arange(indices.shape[0], device=indices.device).view(-1, 1, 1) * keys
    return (indices.clamp_min(0) + offsets).flatten(), valid


def _chunk_logits(q: torch.Tensor, k_sel: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Return masked logits [B, Tc, HKV, G, K] for q [B, Tc, HKV, G, D] fp32 and k_sel [B, Tc, K, HKV, D]."""
    # [B, Tc, HKV, G, D] @ [B, Tc, HKV, D, K] -> [B, Tc, HKV, G, K]
    logits = torch.matmul(q, k_sel.permute(0, 1, 3, 4, 2)) * scale
    return logits.masked_fill(~valid[:, :, None, None, :], float("-inf"))


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, scale, chunk_size):  # type: ignore[override]
        batch, queries, heads, head_dim = q.shape
        keys, kv_heads = k.shape[1], k.shape[2]
        groups = heads // kv_heads
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(batch, queries, heads, dtype=torch.float32, device=q.device)
        for start in range(0, queries, chunk_size):
            stop = min(start + chunk_size, queries)
            idx = indices[:, start:stop]
            valid = idx >= 0
            k_sel = _gather_rows(k, idx.clamp_min(0))
            v_sel = _gather_rows(v, idx.clamp_min(0))
            q_chunk = q[:, start:stop].float().reshape(batch, stop - start, kv_heads, groups, head_dim)
            logits = _chunk_logits(q_chunk, k_sel, valid, scale)
            row_max = logits.amax(dim=-1, keepdim=True)
            row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            probs = torch.exp(logits - row_max)
            denom = probs.sum(dim=-1, keepdim=True)
            # [B, Tc, HKV, G, K] @ [B, Tc, HKV, K, D] -> [B, Tc, HKV, G, D]
            values = torch.matmul(probs, v_sel.permute(0, 1, 3, 2, 4))
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
        grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        grad_k = torch.zeros(batch * keys, kv_heads * head_dim, dtype=torch.float32, device=q.device)
        grad_v = torch.zeros_like(grad_k)
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        for start in range(0, queries, chunk_size):
            stop = min(start + chunk_size, queries)
            width = stop - start
            idx = indices[:, start:stop]
            flat, valid = _flat_indices(idx, keys)
            k_sel = _gather_rows(k, idx.clamp_min(0))
            v_sel = _gather_rows(v, idx.clamp_min(0))
            grouped = (batch, width, kv_heads, groups, head_dim)
            q_chunk = q[:, start:stop].float().reshape(grouped)
            d_out = grad_out[:, start:stop].float().reshape(grouped)
            probs = torch.exp(_chunk_logits(q_chunk, k_sel, valid, scale) - lse[:, start:stop].view(grouped[:-1]).unsqueeze(-1))
            # dV[s] += sum_g p[g, s] dO[g]: [B, Tc, HKV, K, G] @ [B, Tc, HKV, G, D] -> [B, Tc, HKV, K, D]
            d_v_sel = torch.matmul(probs.transpose(-1, -2), d_out)
            # dP = dO V^T, then dS = P * (dP - rowsum(dO * O)).
            d_probs = torch.matmul(d_out, v_sel.permute(0, 1, 3, 4, 2))
            delta = (d_out * out[:, start:stop].float().reshape(grouped)).sum(dim=-1, keepdim=True)
            if grad_lse is not None:
                delta = delta - grad_lse[:, start:stop].float().view(grouped[:-1]).unsqueeze(-1)
            d_logits = probs * (d_probs - delta) * scale
            grad_q[:, start:stop] = torch.matmul(d_logits, k_sel.permute(0, 1, 3, 2, 4)).reshape(
                batch, width, heads, head_dim
            ).to(q.dtype)
            d_k_sel = torch.matmul(d_logits.transpose(-1, -2), q_chunk)  # [B, Tc, HKV, K, D]
            # Empty slots point at row 0 with zero probability, so they add zeros there.
            grad_k.index_add_(0, flat, d_k_sel.permute(0, 1, 3, 2, 4).reshape(flat.numel(), -1))
            grad_v.index_add_(0, flat, d_v_sel.permute(0, 1, 3, 2, 4).reshape(flat.numel(), -1))
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
