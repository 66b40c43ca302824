"""Triton kernels for sparse grouped-query attention: forward, backward (dq, dk, dv) and split-K decode.

    out[b, t, h] = sum_{s in S_t} softmax_s(scale * q[b, t, h] . k[b, s, h // G]) v[b, s, h // G]

S_t is the set of valid entries of indices[b, t] (one set per query, shared by every head; -1 slots
are skipped). One program handles one query and one key/value head: its G query heads form the rows
of a [BLOCK_G, D] tile, so each gathered key or value row is loaded once and serves the whole group.
The loop runs over the K index slots in blocks of BLOCK_K with an online softmax, as FlashAttention
does over contiguous keys. Blocks whose slots are all -1 are skipped without loading anything.

The backward pass recomputes probabilities from the saved log-sum-exp and writes dq per query. dk and
dv are scattered into fp32 buffers with atomic adds, because several queries select the same key, so
their last bits can differ between GPU runs. The index sets must not repeat a key within a row
(top-k selection never does); a repeated key would be counted twice, unlike the dense-mask oracle.

Decoding (T = 1) has only B * HKV programs of K slots each, too few to fill a GPU, so the decode path
splits the K slots over several programs per head and merges their partial results by log-sum-exp.

Head dims up to 256 are supported (64 and 128 exactly, others padded to a power of two with masked
loads); fp16, bf16 and fp32 inputs; products accumulate in fp32 (IEEE, no TF32).

NOTE: these kernels have run only in Triton's CPU interpreter. Compilation for a GPU, block sizes and
num_warps are untested and untuned; benchmarks/bench_triton.py checks and times them on one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa.ops._checks import check_attention_inputs
from dsa.ops._triton import next_power_of_2, require_triton
from dsa.ops._triton_jit import _mm, needs_upcast

BLOCK_K = 32
DECODE_SLOTS_PER_SPLIT = 256
MAX_DECODE_SPLITS = 16


@triton.jit
def _sparse_attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    out_ptr,
    lse_ptr,
    queries,
    slots,
    slots_per_split,
    scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_ib,
    stride_it,
    stride_ik,
    stride_ob,
    stride_ot,
    stride_osplit,
    stride_oh,
    stride_od,
    stride_lb,
    stride_lt,
    stride_lsplit,
    stride_lh,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    batch = row // queries
    query = row % queries
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    heads = kv_head * G + offs_g
    g_ok = offs_g < G
    d_ok = offs_d < D

    q = tl.load(
        q_ptr + batch * stride_qb + query * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    row_max = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    denom = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    first = split * slots_per_split
    last = tl.minimum(first + slots_per_split, slots)
    for start in range(first, last, BLOCK_K):
        slot = start + offs_k
        ids = tl.load(idx_ptr + batch * stride_ib + query * stride_it + slot * stride_ik, mask=slot < last, other=-1)
        valid = ids >= 0
        if tl.sum(valid.to(tl.int32), axis=0) > 0:
            safe = tl.where(valid, ids, 0).to(tl.int64)
            kv_mask = valid[:, None] & d_ok[None, :]
            k_rows = tl.load(k_base + safe[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            # [BLOCK_G, D] @ [D, BLOCK_K] -> [BLOCK_G, BLOCK_K]
            logits = _mm(q, tl.trans(k_rows), UPCAST) * scale
            logits = tl.where(valid[None, :], logits, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            # new_max is finite: this block has a valid slot.
            rescale = tl.exp(row_max - new_max)
            probs = tl.exp(logits - new_max[:, None])
            denom = denom * rescale + tl.sum(probs, axis=1)
            v_rows = tl.load(v_base + safe[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            acc = acc * rescale[:, None] + _mm(probs.to(v_rows.dtype), v_rows, UPCAST)
            row_max = new_max

    has_key = denom > 0
    out = tl.where(has_key[:, None], acc / tl.where(has_key, denom, 1.0)[:, None], 0.0)
    lse = tl.where(has_key, row_max + tl.log(tl.where(has_key, denom, 1.0)), float("inf"))
    tl.store(
        out_ptr
        + batch * stride_ob
        + query * stride_ot
        + split * stride_osplit
        + heads[:, None] * stride_oh
        + offs_d[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=g_ok[:, None] & d_ok[None, :],
    )
    tl.store(lse_ptr + batch * stride_lb + query * stride_lt + split * stride_lsplit + heads * stride_lh, lse, mask=g_ok)


@triton.jit
def _sparse_attention_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    out_ptr,
    lse_ptr,
    d_out_ptr,
    d_lse_ptr,
    d_q_ptr,
    d_k_ptr,
    d_v_ptr,
    queries,
    slots,
    scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_ib,
    stride_it,
    stride_ik,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_od,
    stride_lb,
    stride_lt,
    stride_lh,
    stride_gb,
    stride_gs,
    stride_gh,
    stride_gd,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_D_LSE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Backward of one query and kv head. q, out, d_out and d_q share the strides of the contiguous
    [B, T, H, D] layout, and lse and d_lse those of [B, T, H]. d_k and d_v are contiguous fp32
    [B, S, HKV, D] buffers with strides stride_g*."""
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    batch = row // queries
    query = row % queries
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    heads = kv_head * G + offs_g
    g_ok = offs_g < G
    d_ok = offs_d < D
    gd_mask = g_ok[:, None] & d_ok[None, :]
    gd_offsets = batch * stride_ob + query * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od

    q = tl.load(
        q_ptr + batch * stride_qb + query * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=gd_mask,
        other=0.0,
    )
    out = tl.load(out_ptr + gd_offsets, mask=gd_mask, other=0.0).to(tl.float32)
    d_out = tl.load(d_out_ptr + gd_offsets, mask=gd_mask, other=0.0)
    lse_offsets = batch * stride_lb + query * stride_lt + heads * stride_lh
    # Padded heads and empty rows have lse = +inf, so their probabilities are exp(-inf) = 0.
    lse = tl.load(lse_ptr + lse_offsets, mask=g_ok, other=float("inf"))
    # delta = rowsum(dO * O) - dlse: dS = P * (dP - delta).
    delta = tl.sum(d_out.to(tl.float32) * out, axis=1)
    if HAS_D_LSE:
        delta -= tl.load(d_lse_ptr + lse_offsets, mask=g_ok, other=0.0)

    d_q = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    grad_base = batch * stride_gb + kv_head * stride_gh
    for start in range(0, slots, BLOCK_K):
        slot = start + offs_k
        ids = tl.load(idx_ptr + batch * stride_ib + query * stride_it + slot * stride_ik, mask=slot < slots, other=-1)
        valid = ids >= 0
        if tl.sum(valid.to(tl.int32), axis=0) > 0:
            safe = tl.where(valid, ids, 0).to(tl.int64)
            kv_mask = valid[:, None] & d_ok[None, :]
            k_rows = tl.load(k_base + safe[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v_rows = tl.load(v_base + safe[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            logits = _mm(q, tl.trans(k_rows), UPCAST) * scale
            probs = tl.where(valid[None, :], tl.exp(logits - lse[:, None]), 0.0)  # [BLOCK_G, BLOCK_K]
            # dV[s] += sum_g P[g, s] dO[g]
            d_v_rows = _mm(tl.trans(probs.to(d_out.dtype)), d_out, UPCAST)
            d_probs = _mm(d_out, tl.trans(v_rows), UPCAST)
            d_logits = probs * (d_probs - delta[:, None]) * scale
            d_q += _mm(d_logits.to(k_rows.dtype), k_rows, UPCAST)
            d_k_rows = _mm(tl.trans(d_logits.to(q.dtype)), q, UPCAST)
            grad_offsets = grad_base + safe[:, None] * stride_gs + offs_d[None, :] * stride_gd
            tl.atomic_add(d_k_ptr + grad_offsets, d_k_rows, mask=kv_mask)
            tl.atomic_add(d_v_ptr + grad_offsets, d_v_rows, mask=kv_mask)

    tl.store(d_q_ptr + gd_offsets, d_q.to(d_q_ptr.dtype.element_ty), mask=gd_mask)


def _block_sizes(heads: int, kv_heads: int, head_dim: int) -> dict[str, int]:
    if head_dim > 256:
        raise ValueError(f"the Triton sparse attention supports head dims up to 256, got D={head_dim}; use backend='torch'.")
    groups = heads // kv_heads
    # tl.dot needs every tile side >= 16: small groups (G = 3 in SmolLM2) are padded with masked rows.
    return {"G": groups, "D": head_dim, "BLOCK_G": max(16, next_power_of_2(groups)), "BLOCK_D": max(16, next_power_of_2(head_dim))}


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, scale: float, splits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel over `splits` slices of the K slots; return out and lse [B, T, H]."""
    batch, queries, heads, head_dim = q.shape
    kv_heads, slots = k.shape[2], indices.shape[2]
    blocks = _block_sizes(heads, kv_heads, head_dim)
    if splits == 1:
        out = torch.empty_like(q)
        lse = torch.empty(batch, queries, heads, dtype=torch.float32, device=q.device)
        out_strides = (out.stride(0), out.stride(1), 0, out.stride(2), out.stride(3))
        lse_strides = (lse.stride(0), lse.stride(1), 0, lse.stride(2))
        slots_per_split = max(slots, 1)
    else:
        out = torch.empty(batch, queries, splits, heads, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, queries, splits, heads, dtype=torch.float32, device=q.device)
        out_strides, lse_strides = out.stride(), lse.stride()
        slots_per_split = triton.cdiv(triton.cdiv(slots, splits), BLOCK_K) * BLOCK_K
    if batch * queries == 0:
        return out, lse
    _sparse_attention_fwd_kernel[(batch * queries, kv_heads, splits)](
        q,
        k,
        v,
        indices,
        out,
        lse,
        queries,
        slots,
        slots_per_split,
        scale,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *indices.stride(),
        *out_strides,
        *lse_strides,
        BLOCK_K=BLOCK_K,
        UPCAST=needs_upcast(q.dtype),
        **blocks,
    )
    if splits == 1:
        return out, lse
    return _merge_splits(out, lse, q.dtype)


def _merge_splits(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial results out [B, T, P, H, D] and lse [B, T, P, H] (+inf where a split was empty)."""
    lse = lse.masked_fill(torch.isinf(lse), float("-inf"))
    total = torch.logsumexp(lse, dim=2)  # [B, T, H]; -inf where every split was empty
    has_key = torch.isfinite(total)
    weights = torch.exp(lse - torch.where(has_key, total, 0.0).unsqueeze(2))  # [B, T, P, H]
    merged = (weights.unsqueeze(-1) * out).sum(dim=2)
    return merged.to(dtype), total.masked_fill(~has_key, float("inf"))


class _SparseAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, scale):  # type: ignore[override]
        out, lse = _forward(q, k, v, indices, scale, splits=1)
        ctx.save_for_backward(q, k, v, indices, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):  # type: ignore[override]
        q, k, v, indices, out, lse = ctx.saved_tensors
        batch, queries, heads, head_dim = q.shape
        kv_heads, slots = k.shape[2], indices.shape[2]
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        d_lse = lse if grad_lse is None else grad_lse.float().contiguous()
        if batch * queries > 0:
            _sparse_attention_bwd_kernel[(batch * queries, kv_heads)](
                q,
                k,
                v,
                indices,
                out,
                lse,
                grad_out,
                d_lse,
                grad_q,
                grad_k,
                grad_v,
                queries,
                slots,
                ctx.scale,
                *q.stride(),
                *k.stride(),
                *v.stride(),
                *indices.stride(),
                *out.stride(),
                *lse.stride(),
                *grad_k.stride(),
                BLOCK_K=BLOCK_K,
        UPCAST=needs_upcast(q.dtype),
                HAS_D_LSE=grad_lse is not None,
                **_block_sizes(heads, kv_heads, head_dim),
            )
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), None, None


def decode_splits(batch: int, queries: int, kv_heads: int, slots: int) -> int:
    """Number of K-slot slices per head: 1 for prefill, up to 16 for a decode step with few programs."""
    if batch * queries * kv_heads >= 128:
        return 1
    return max(1, min(MAX_DECODE_SPLITS, triton.cdiv(slots, DECODE_SLOTS_PER_SPLIT)))


def sparse_attention_triton(
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

    Same contract as `sparse_attention_torch`. k and v may be strided views of the Hugging Face cache
    layout [B, HKV, S, D], which are read in place. When no gradient is needed and there are few programs
    (a decode step), the K slots are split over several programs per head. `chunk_size` is accepted for
    signature parity and ignored: the kernels never materialise more than a block of slots.
    """
    check_attention_inputs(q, k, v, indices)
    require_triton(q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q = q.contiguous()
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad:
        out, lse = _SparseAttentionTriton.apply(q, k, v, indices, scale)
    else:
        splits = decode_splits(q.shape[0], q.shape[1], k.shape[2], indices.shape[2])
        out, lse = _forward(q, k, v, indices, scale, splits)
    return (out, lse) if return_lse else out


def sparse_attention_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    scale: float | None = None,
    *,
    splits: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Forward-only split-K sparse attention, for decode steps (any T works; no autograd).

    `splits` slices the K slots of each query over that many programs per head (default: by
    `decode_splits`); the partial results are merged by log-sum-exp.
    """
    check_attention_inputs(q, k, v, indices)
    require_triton(q.device)
    if splits is None:
        splits = decode_splits(q.shape[0], q.shape[1], k.shape[2], indices.shape[2])
    elif not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits={splits!r} is invalid; expected an integer >= 1.")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, lse = _forward(q.contiguous(), k, v, indices, scale, splits)
    return (out, lse) if return_lse else out
