"""DSA operators: the lightning indexer score, top-k selection, sparse attention and indexer losses.

Shape alphabet, used in every docstring and reshape comment:

    B    batch                          HI   indexer heads
    T    queries in the current block   DI   indexer head dim
    S    keys (cached prefix + T)       R    rotated (RoPE) dims of each indexer head
    H    attention query heads          K    selected keys per query (top-k slots)
    HKV  attention key/value heads      Tc   queries in one chunk
    G    H / HKV, query heads per KV head
    D    attention head dim

Positions: query t of a block sits at key position q_start + t (default q_start = S - T) and sees the
keys s <= q_start + t that `key_padding_mask` [B, S] (True = keep) keeps. Index sets are [B, T, K] int64,
ascending, with -1 in empty slots.

Each operator has a readable reference (`*_reference`, fp32, full matrices) and a chunked PyTorch
implementation with the same signature; `dsa.ops.dispatch.resolve_backend` picks one by name.
"""

from dsa.ops.indexer import index_scores_reference, index_scores_torch
from dsa.ops.indexer_loss import sparse_kl_blockwise, sparse_kl_reference, warmup_kl_blockwise, warmup_kl_reference
from dsa.ops.rope import apply_partial_rope, rope_cos_sin, rope_inverse_frequencies
from dsa.ops.sparse_attention import indices_to_mask, sparse_attention_reference, sparse_attention_torch
from dsa.ops.topk import select_topk_reference, select_topk_torch

__all__ = [
    "apply_partial_rope",
    "index_scores_reference",
    "index_scores_torch",
    "indices_to_mask",
    "rope_cos_sin",
    "rope_inverse_frequencies",
    "select_topk_reference",
    "select_topk_torch",
    "sparse_attention_reference",
    "sparse_attention_torch",
    "sparse_kl_blockwise",
    "sparse_kl_reference",
    "warmup_kl_blockwise",
    "warmup_kl_reference",
]
