"""Reference for the fused sparse prefill: the whole selection, then sparse attention over it.

Holds the [B, T, K] index sets and the references' full matrices; a test oracle, never a fast path.
"""

from __future__ import annotations

import torch

from dsa.ops.sparse_attention.naive import sparse_attention_reference
from dsa.ops.topk.naive import select_topk_reference


def sparse_prefill_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    weights: torch.Tensor,
    top_k: int,
    scale: float | None = None,
    *,
    q_start: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    sink_tokens: int = 0,
    local_tokens: int = 0,
    chunk_size: int = 256,
    score_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return out [B, T, H, D] and keys per query [B, T] (int64).

    Inputs: q [B, T, H, D], k and v [B, S, HKV, D], and the indexer's q_idx [B, T, HI, DI], k_idx
    [B, S, DI] and weights [B, T, HI].

    `score_dtype` is the dtype of the index scores' q . k product. `chunk_size` is accepted for
    signature parity with the fast path and ignored here.
    """
    indices = select_topk_reference(
        q_idx, k_idx, weights, top_k, q_start=q_start, key_padding_mask=key_padding_mask,
        attention_mask=attention_mask, sink_tokens=sink_tokens, local_tokens=local_tokens, score_dtype=score_dtype,
    )
    out = sparse_attention_reference(q, k, v, indices, scale)
    return out, (indices >= 0).sum(dim=-1)
