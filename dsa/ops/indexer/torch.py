"""Chunked PyTorch lightning indexer score: same result as `index_scores_reference`, bounded memory.

The per-head logits [B, Tc, HI, S] exist for one chunk of Tc queries at a time; the head-weighted sum
is a batched matrix-vector product, so no [B, T, HI, S] tensor is ever held.

On the CPU, a chunk of many queries with fp32 or bf16 keys [B, DI, S] (unit stride along S, or the
transposed view of the [B, S, DI] cache) goes to the fused C++ kernel of `dsa.ops.indexer.cpu`, which never writes the
logits. `index_scores_chunk_torch` is the PyTorch path it replaces, and the tests check one against
the other.

The q . k product runs in the dtype of the keys it is given: fp32, or bf16 when the caller asks for a
bf16 score product (`score_dtype`), where q and k are rounded to bf16 and the product returns bf16
logits. The ReLU and the head-weighted sum always run in fp32.
"""

from __future__ import annotations

import torch

from dsa.ops._checks import check_indexer_inputs, check_score_dtype
from dsa.ops.indexer.cpu import cpu_kernel_applies, index_scores_chunk_cpu, kernel_reads

# Up to this many (query, indexer head) pairs per chunk, scores are computed keys-major (decode).
FEW_QUERY_HEADS = 64


def index_scores_chunk(q_idx: torch.Tensor, k_idx_t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Return scores [B, Tc, S] fp32 for q_idx [B, Tc, HI, DI], k_idx_t [B, DI, S], weights [B, Tc, HI].

    The product runs in k_idx_t's dtype (fp32 or bf16). No validation: callers pass checked,
    transposed keys already in that dtype, so a loop over chunks converts them once. Many queries
    against keys the kernel reads in place take the fused CPU kernel (see `kernel_layout`).
    """
    if q_idx.shape[1] * q_idx.shape[2] > FEW_QUERY_HEADS and cpu_kernel_applies(q_idx, k_idx_t):
        return index_scores_chunk_cpu(q_idx, k_idx_t, weights)
    return index_scores_chunk_torch(q_idx, k_idx_t, weights)


def kernel_layout(k_idx_t: torch.Tensor, queries: int, heads: int) -> torch.Tensor:
    """Return the keys k_idx_t [B, DI, S] in a layout the fused CPU kernel reads when chunks of `queries`
    queries and `heads` heads would take it, else k_idx_t unchanged.

    The kernel reads keys with unit stride along S or along DI, so the usual input, a transposed view of
    the [B, S, DI] cache, is returned as it is. Other strides are copied once per call (S * DI values)
    rather than once per chunk.
    """
    if kernel_reads(k_idx_t) or queries * heads <= FEW_QUERY_HEADS:
        return k_idx_t
    return k_idx_t.contiguous() if cpu_kernel_applies(k_idx_t, k_idx_t, require_layout=False) else k_idx_t


def index_scores_chunk_torch(q_idx: torch.Tensor, k_idx_t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Compute `index_scores_chunk` in PyTorch: per-head logits, ReLU, then the head-weighted sum."""
    batch, queries, heads, head_dim = q_idx.shape
    scale = heads**-0.5 * head_dim**-0.5
    head_weights = (weights.float() * scale).unsqueeze(-1)  # [B, Tc, HI, 1]
    keys_major = k_idx_t.transpose(1, 2)
    if queries * heads <= FEW_QUERY_HEADS and keys_major.is_contiguous():
        # Decode: keys-major [S, DI] @ [DI, Tc * HI] per batch row reads the key cache row by row, as a
        # matrix-vector product. The transposed product below would stride through it.
        q_rows = q_idx.to(k_idx_t.dtype).reshape(batch, queries * heads, head_dim)
        rows = [_keys_major_product(keys_major[b], q_rows[b]) for b in range(batch)]
        logits = (rows[0].unsqueeze(0) if batch == 1 else torch.stack(rows)).float().relu_()
        # [B, Tc, S, HI] @ [B, Tc, HI, 1] -> [B, Tc, S]
        return torch.matmul(logits.view(batch, -1, queries, heads).transpose(1, 2), head_weights).squeeze(-1)
    # [B, Tc * HI, DI] @ [B, DI, S] -> [B, Tc, HI, S]
    logits = torch.bmm(q_idx.to(k_idx_t.dtype).reshape(batch, queries * heads, head_dim), k_idx_t)
    logits = logits.view(batch, queries, heads, -1).float().relu_()
    # [B, Tc, 1, HI] @ [B, Tc, HI, S] -> [B, Tc, S]
    return torch.matmul(head_weights.transpose(-1, -2), logits).squeeze(2)


# A bf16 decode product covers the first multiple of this many keys (see _keys_major_product).
SHAPE_STEP = 256


def _keys_major_product(keys: torch.Tensor, q_rows: torch.Tensor) -> torch.Tensor:
    """Return keys [S, DI] @ q_rows[N, DI]^T as [S, N] in keys' dtype.

    On the CPU, PyTorch runs bf16 products through oneDNN, which builds a kernel for each new shape
    (about 0.3 ms, measured with ONEDNN_VERBOSE=2) and keeps it in a cache. A decode step has one
    more key than the last, so the bf16 product covers the first multiple of SHAPE_STEP keys, a shape
    that lasts SHAPE_STEP steps. The remaining keys are multiplied in fp32 and rounded to bf16, which
    is what the bf16 product returns for them.
    """
    if keys.dtype == torch.float32:
        return torch.nn.functional.linear(keys, q_rows)
    count = keys.shape[0]
    bulk = count - count % SHAPE_STEP
    out = torch.empty(count, q_rows.shape[0], dtype=keys.dtype, device=keys.device)
    if bulk:
        torch.mm(keys[:bulk], q_rows.t(), out=out[:bulk])
    if bulk < count:
        out[bulk:] = torch.mm(keys[bulk:].float(), q_rows.float().t())
    return out


def index_scores_torch(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int = 256,
    score_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return index scores [B, T, S] in fp32 for q_idx [B, T, HI, DI], k_idx [B, S, DI], weights [B, T, HI].

    `score_dtype` torch.bfloat16 runs the q . k product in bf16 (see the module docstring)."""
    check_indexer_inputs(q_idx, k_idx, weights)
    check_score_dtype(score_dtype)
    k_idx_t = kernel_layout(k_idx.to(score_dtype).transpose(1, 2), min(chunk_size, q_idx.shape[1]), q_idx.shape[2])
    if q_idx.shape[1] <= chunk_size:
        return index_scores_chunk(q_idx, k_idx_t, weights)
    chunks = [
        index_scores_chunk(q_idx[:, start : start + chunk_size], k_idx_t, weights[:, start : start + chunk_size])
        for start in range(0, q_idx.shape[1], chunk_size)
    ]
    return torch.cat(chunks, dim=1)
