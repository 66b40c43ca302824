"""Fused sparse prefill in PyTorch: selection and sparse attention one block of queries at a time.

Running `select_topk_torch` over all T queries and then `sparse_attention_torch` keeps the index sets
[B, T, K] in memory: 256 MiB of int64 at T = 16k and K = 2048. Dense attention allocates little more
than its [B, T, H, D] output. Here each block of queries is selected and attended before the next one, so the
extra memory is one block's scores and index sets. There is no backward pass: training uses the two
operators, whose sparse attention saves what its backward needs.

On the CPU with fp32 inputs, both steps run in the C++ kernels where they apply: the fused index
scores (`dsa.ops.indexer.cpu`) and the sparse attention that reads each query's rows in place
(`dsa.ops.sparse_attention.cpu`). Elsewhere the attention takes the tile-union forward of
`sparse_attention_torch`.
"""

from __future__ import annotations

import torch

from dsa.ops._checks import check_attention_inputs, check_indexer_inputs, check_score_dtype, resolve_mask_args
from dsa.ops.indexer.cpu import cpu_kernel_applies
from dsa.ops.indexer.torch import kernel_layout
from dsa.ops.sparse_attention.cpu import sparse_attention_cpu, sparse_attention_cpu_applies
from dsa.ops.sparse_attention.torch import UNION_TILE, _union_forward
from dsa.ops.topk.naive import check_selection_args
from dsa.ops.topk.torch import select_topk_torch

SCORE_BUDGET = 2**22
"""Upper bound on the score elements of one selection chunk, 16 MiB of fp32: the per-head logits
[Tc * HI, S] on the PyTorch path, the scores [Tc, S] with the fused CPU kernel, which writes no logits."""

MIN_CHUNK = 16
"""Minimum queries per selection chunk, however long the keys, so that per-chunk overhead stays small."""

KERNEL_BLOCK = 32
"""Maximum queries per block when the CPU attention kernel runs. A block's index sets (and its
selection's scores, see KERNEL_SCORE_CHUNK) are the prefill's extra memory. On a 2-core Intel Xeon
(random SmolLM2-135M inputs, one process), blocks of 64 instead of 256 queries cut the peak growth at
16k tokens from 74.5 to 48.7 MiB, of which the output is 36 MiB. The 16k prefill took 1.39 s against
1.43 s. Since each block's selection writes into one reused buffer, blocks of 32 instead of 64 cut a
4k prefill's growth on real text from 11.1 to 10.3 MiB, against 10.1 MiB for dense attention."""

CPU_UNION_BLOCK = 32
"""Maximum queries per block on the CPU when the tile-union forward attends (head dims the C++ attention
does not take, such as Qwen3-4B's 128)."""

KERNEL_SCORE_CHUNK = 32
"""Queries per selection chunk inside a block when the fused CPU kernels select and attend. A chunk's
scores [Tc, S'] (or, past 3 * top_k keys, its candidates) are the selection's temporaries: 512 KiB at
4k keys, where dense attention needs about 1 MiB beyond its output. With 4 indexer heads, 32 queries
is the smallest chunk the fused kernel scores, because it needs more than FEW_QUERY_HEADS query heads.
Smaller chunks take the PyTorch product, whose per-head logits [S', Tc * HI] are as large as 64
queries' scores."""


def _score_chunk(chunk_size: int, indexer_heads: int, keys: int) -> int:
    """Return the queries per selection chunk: `chunk_size`, or fewer so that a chunk's scores fit
    SCORE_BUDGET."""
    return max(MIN_CHUNK, min(chunk_size, SCORE_BUDGET // max(1, indexer_heads * keys)))


def sparse_prefill_torch(
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
    """Return out [B, T, H, D] (q's dtype) and keys per query [B, T] (int64).

    Inputs: q [B, T, H, D], k and v [B, S, HKV, D], and the indexer's q_idx [B, T, HI, DI], k_idx
    [B, S, DI] and weights [B, T, HI].

    The result equals `select_topk_torch` followed by `sparse_attention_torch`, but [B, T, K] is never
    allocated. Blocks have `chunk_size` queries, at most KERNEL_BLOCK with the CPU attention kernel and
    at most UNION_TILE with the tile-union forward on the CPU. Their selection runs in chunks of fewer
    queries at long S (see SCORE_BUDGET).
    `score_dtype` is the dtype of the index scores' q . k product (`select_topk_torch`).
    Raises ValueError when a gradient is required, since there is no backward pass.
    """
    batch, queries, heads, head_dim = q.shape
    # No index sets exist yet, so an empty [B, T, 0] replaces them for the q, k, v checks.
    check_attention_inputs(q, k, v, torch.empty(batch, queries, 0, dtype=torch.int64, device=q.device))
    check_indexer_inputs(q_idx, k_idx, weights)
    keys = k.shape[1]
    if q_idx.shape[:2] != (batch, queries) or k_idx.shape[1] != keys:
        raise ValueError(
            f"indexer inputs q_idx {tuple(q_idx.shape)} and k_idx {tuple(k_idx.shape)} do not match q {tuple(q.shape)} "
            f"and k {tuple(k.shape)}; expected [B, T, HI, DI] and [B, S, DI]."
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} is invalid; expected an integer >= 1.")
    check_selection_args(top_k, sink_tokens, local_tokens)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, q_idx, k_idx, weights)):
        raise ValueError(
            "sparse_prefill_torch has no backward pass; run it under torch.no_grad(), or use select_topk_torch and "
            "sparse_attention_torch for training."
        )
    q_start = resolve_mask_args(queries, keys, batch, q_start, key_padding_mask, attention_mask)
    scale = head_dim**-0.5 if scale is None else float(scale)
    check_score_dtype(score_dtype)
    attend_in_kernel = sparse_attention_cpu_applies(q, k, v)
    if attend_in_kernel:
        block = min(chunk_size, KERNEL_BLOCK)
    elif q.device.type == "cpu":
        # Each block is one tile of the tile-union forward, so the block bounds the selection's scores,
        # the index sets and the tile's SDPA output and float mask. At Qwen3-4B shapes (4k tokens, 2-core
        # Intel Xeon) blocks of 32 instead of 64 queries cut the growth from 67.0 to 65.6 MiB (dense:
        # 65.6). The prefill took 1.38 to 1.46 s against 1.36 to 1.39 s (three calls each).
        block = min(chunk_size, UNION_TILE, CPU_UNION_BLOCK)
    else:
        block = chunk_size
    # Converted once here to the score dtype, so that no block's selection copies the keys. The fused
    # CPU kernel reads the cache's [B, S, DI] layout in place; only other strides are copied.
    k_idx_t = kernel_layout(k_idx.to(score_dtype).transpose(1, 2), block, q_idx.shape[2])
    k_idx = k_idx_t.transpose(1, 2)
    # The kernel writes no per-head logits, so its chunks are bounded by the scores alone.
    fused = cpu_kernel_applies(q_idx, k_idx_t)
    lean = fused and attend_in_kernel
    score_chunk = _score_chunk(min(block, KERNEL_SCORE_CHUNK) if lean else block, 1 if fused else q_idx.shape[2], keys)

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    counts = torch.empty(batch, queries, dtype=torch.int64, device=q.device)
    # One index buffer for all blocks: the selection writes each block's rows into it, in int32, half the
    # bytes of int64 (256 KiB at 32 queries and top_k 2048), which the C++ attention and the tile-union
    # forward both read.
    index_dtype = torch.int32 if keys <= torch.iinfo(torch.int32).max else torch.int64
    block_indices = torch.empty(batch, min(block, queries), min(top_k, keys), dtype=index_dtype, device=q.device)
    for start in range(0, queries, block):
        stop = min(start + block, queries)
        # Keys past the block's last query are invisible to all of it.
        span = q_start + stop
        indices = select_topk_torch(
            q_idx[:, start:stop], k_idx[:, :span], weights[:, start:stop], top_k,
            q_start=q_start + start,
            key_padding_mask=None if key_padding_mask is None else key_padding_mask[:, :span],
            attention_mask=None if attention_mask is None else attention_mask[:, start:stop, :span],
            sink_tokens=sink_tokens, local_tokens=local_tokens, chunk_size=score_chunk, score_dtype=score_dtype,
            out=block_indices[:, : stop - start, : min(top_k, span)],
        )
        if attend_in_kernel:
            out[:, start:stop] = sparse_attention_cpu(q[:, start:stop], k[:, :span], v[:, :span], indices, scale)
        else:
            _union_forward(q[:, start:stop], k[:, :span], v[:, :span], indices, scale, block, need_lse=False, out=out[:, start:stop])
        counts[:, start:stop] = (indices >= 0).sum(dim=-1)
    return out, counts
