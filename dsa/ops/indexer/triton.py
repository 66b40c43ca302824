"""Triton kernel for the lightning indexer score, with the head-weighted ReLU sum fused.

    I[b, t, s] = sum_j  w[b, t, j] * HI^-0.5 * DI^-0.5 * ReLU(q[b, t, j] . k[b, s])

One program computes a [BLOCK_T, BLOCK_S] tile of I for a tile of queries against a tile of keys. The
per-head logits [BLOCK_T, HI, BLOCK_S] live only in registers: the kernel writes the summed score, so the
[T, HI, S] tensor of the PyTorch path never reaches global memory. Keys a row cannot see (beyond its
causal limit, or padded) are written as -inf, and tiles that lie wholly beyond every row's causal limit
are filled with -inf without loading anything. Top-k selection reads the scores of one chunk of queries
at a time (`select_topk_torch(scores_fn=index_scores_chunk_triton)`), so no full [T, S] matrix is held.

Dot products accumulate in fp32 (IEEE, no TF32) whatever the input dtype, as in the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa.ops._checks import check_indexer_inputs
from dsa.ops._triton import next_power_of_2, require_triton
from dsa.ops._triton_jit import _mm, needs_upcast

BLOCK_T = 16
BLOCK_S = 64


@triton.jit
def _index_scores_kernel(
    q_ptr,
    k_ptr,
    w_ptr,
    key_valid_ptr,
    out_ptr,
    queries,
    keys,
    first_position,
    scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kd,
    stride_wb,
    stride_wt,
    stride_wh,
    stride_vb,
    stride_vs,
    stride_ob,
    stride_ot,
    stride_os,
    HI: tl.constexpr,
    DI: tl.constexpr,
    BLOCK_DI: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    UPCAST: tl.constexpr,
    MIXED: tl.constexpr,
):
    key_block = tl.program_id(0)
    query_block = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    offs_t = query_block * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = key_block * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_DI)
    row_ok = offs_t < queries
    key_ok = offs_s < keys
    out_ptrs = out_ptr + batch * stride_ob + offs_t[:, None] * stride_ot + offs_s[None, :] * stride_os
    out_mask = row_ok[:, None] & key_ok[None, :]

    tile_start = key_block * BLOCK_S
    if CAUSAL:
        beyond = tile_start > first_position + tl.minimum(query_block * BLOCK_T + BLOCK_T, queries) - 1
    else:
        beyond = tile_start >= keys
    if beyond:
        # Every key of this tile is in every row's future.
        tl.store(out_ptrs, tl.full((BLOCK_T, BLOCK_S), float("-inf"), tl.float32), mask=out_mask)
    else:
        d_ok = offs_d < DI
        k_tile = tl.load(
            k_ptr + batch * stride_kb + offs_s[:, None] * stride_ks + offs_d[None, :] * stride_kd,
            mask=key_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if MIXED:
            # tl.dot needs one operand dtype: the model's q_idx (bf16, say) meets the fp32 key cache.
            k_tile = k_tile.to(tl.float32)
        acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
        for head in tl.static_range(HI):
            q_head = tl.load(
                q_ptr + batch * stride_qb + offs_t[:, None] * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if MIXED:
                q_head = q_head.to(tl.float32)
            # [BLOCK_T, DI] @ [DI, BLOCK_S] -> [BLOCK_T, BLOCK_S]
            logits = _mm(q_head, tl.trans(k_tile), UPCAST)
            weight = tl.load(w_ptr + batch * stride_wb + offs_t * stride_wt + head * stride_wh, mask=row_ok, other=0.0)
            acc += (weight.to(tl.float32) * scale)[:, None] * tl.maximum(logits, 0.0)
        visible = out_mask
        if CAUSAL:
            visible = visible & (offs_s[None, :] <= first_position + offs_t[:, None])
        if HAS_KEY_VALID:
            keep = tl.load(key_valid_ptr + batch * stride_vb + offs_s * stride_vs, mask=key_ok, other=0)
            visible = visible & (keep != 0)[None, :]
        tl.store(out_ptrs, tl.where(visible, acc, float("-inf")), mask=out_mask)


def index_scores_triton(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    weights: torch.Tensor,
    *,
    q_start: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return index scores [B, T, S] in fp32 for q_idx [B, T, HI, DI], k_idx [B, S, DI], weights [B, T, HI].

    Without `q_start` and `key_padding_mask` the result equals `index_scores_reference`. With
    `q_start` (the position of query 0; S - T for a causal prefill or decode) keys s > q_start + t are
    -inf in row t; with `key_padding_mask` [B, S] (bool, True = keep) masked keys are -inf in every row.
    Inputs may be strided views; nothing is copied.
    """
    check_indexer_inputs(q_idx, k_idx, weights)
    require_triton(q_idx.device)
    batch, queries, heads, head_dim = q_idx.shape
    keys = k_idx.shape[1]
    if head_dim > 256:
        raise ValueError(f"the Triton indexer supports indexer_head_dim up to 256, got DI={head_dim}; use backend='torch'.")
    if q_start is not None and not 0 <= q_start:
        raise ValueError(f"q_start={q_start} is invalid; expected the position of the first query, >= 0.")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, keys):
            raise ValueError(
                f"key_padding_mask must be bool [B, S] = {(batch, keys)}, got {key_padding_mask.dtype} "
                f"{tuple(key_padding_mask.shape)}."
            )
        key_valid = key_padding_mask.to(torch.int8)
    else:
        key_valid = torch.empty(1, 1, dtype=torch.int8, device=q_idx.device)
    out = torch.empty(batch, queries, keys, dtype=torch.float32, device=q_idx.device)
    if queries == 0 or keys == 0:
        return out
    grid = (triton.cdiv(keys, BLOCK_S), triton.cdiv(queries, BLOCK_T), batch)
    _index_scores_kernel[grid](
        q_idx,
        k_idx,
        weights,
        key_valid,
        out,
        queries,
        keys,
        0 if q_start is None else q_start,
        heads**-0.5 * head_dim**-0.5,
        *q_idx.stride(),
        *k_idx.stride(),
        *weights.stride(),
        *key_valid.stride(),
        *out.stride(),
        HI=heads,
        DI=head_dim,
        BLOCK_DI=max(16, next_power_of_2(head_dim)),
        BLOCK_T=BLOCK_T,
        BLOCK_S=BLOCK_S,
        CAUSAL=q_start is not None,
        HAS_KEY_VALID=key_padding_mask is not None,
        UPCAST=needs_upcast(q_idx.dtype) and q_idx.dtype == k_idx.dtype,
        MIXED=q_idx.dtype != k_idx.dtype,
    )
    return out


def index_scores_chunk_triton(
    q_idx: torch.Tensor, k_idx_t: torch.Tensor, weights: torch.Tensor, first_position: int
) -> torch.Tensor:
    """Return scores [B, Tc, S] for one chunk of queries, for `select_topk_torch(scores_fn=...)`.

    k_idx_t is the [B, DI, S] transposed key view of the PyTorch selection loop. Keys beyond each row's
    causal limit come back as -inf, which the selection would apply anyway.
    """
    return index_scores_triton(q_idx, k_idx_t.transpose(1, 2), weights, q_start=first_position)
