"""Sparse attention in chunked PyTorch: gathers the K selected key/value rows of each query.

Work and memory scale with T * K instead of T * S: for a chunk of Tc queries the gathered keys and
values are [B, Tc, HKV, K, D] and the logits [B, Tc, HKV, G, K]. The backward pass recomputes the
chunk's probabilities from the saved log-sum-exp (as FlashAttention does), so autograd keeps only
q, k, v, indices, out and lse. Matmuls run in fp32; out and gradients return in the input dtype.
"""

from __future__ import annotations

import torch

from dsa.ops._checks import check_attention_inputs
from dsa.ops.sparse_attention.cpu import sparse_attention_cpu, sparse_attention_cpu_applies


def _row_view(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Return x [B, S, HKV, D] as rows [N, D] without a copy, and the row-id strides (batch, key, head).

    Any layout whose D values are adjacent and whose other strides are multiples of D is read in place:
    contiguous, a transposed view of a [B, HKV, S, D] tensor (the Hugging Face cache layout), and the
    first S positions of a static cache's preallocated buffer. Other layouts are copied once.
    """
    head_dim = x.shape[-1]
    # A dimension of size 1 is only ever indexed at 0, so its stride does not matter.
    strides = [0 if size == 1 else stride for size, stride in zip(x.shape[:3], x.stride()[:3])]
    if x.numel() > 0 and (x.stride(-1) == 1 or head_dim == 1):
        if all(stride % head_dim == 0 for stride in strides):
            row_strides = tuple(stride // head_dim for stride in strides)
            rows = 1 + sum((size - 1) * stride for size, stride in zip(x.shape[:3], row_strides))
            return x.as_strided((rows, head_dim), (head_dim, 1)), row_strides  # type: ignore[return-value]
    x = x.contiguous()
    keys, kv_heads = x.shape[1], x.shape[2]
    return x.view(-1, head_dim), (keys * kv_heads, kv_heads, 1)


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


def _per_query_forward(q, k, v, indices, scale: float, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass that gathers each query's K selected rows, one chunk of queries at a time."""
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
    return out, lse


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, scale, chunk_size):  # type: ignore[override]
        out, lse = _per_query_forward(q, k, v, indices, scale, chunk_size)
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


UNION_TILE = 64
"""Consecutive queries whose index sets are merged by the no-grad forward (see `_union_forward`)."""

UNION_WIDTH_FACTOR = 16
"""A tile uses its union when that is at most this many times wider than K; otherwise per-query gathers."""


PREFIX_SHARE = 0.75
"""A tile whose union covers at least this share of the keys up to its last one reads that prefix in
place (a view) instead of gathering the union."""


def _union_forward(
    q, k, v, indices, scale: float, chunk_size: int, need_lse: bool, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward pass without autograd that gathers each tile's union of selected keys once.

    Consecutive queries select overlapping sets: on SmolLM2 over real text, 64 queries with 256 keys
    each touch about 1,000 distinct keys, not 16,384. For each tile of UNION_TILE queries this takes
    the union U of their keys once per kv head (a view of the key prefix when U covers most of it, see
    PREFIX_SHARE, else a gather)
    and runs PyTorch's fused `scaled_dot_product_attention` over it, with each query's own set as a
    boolean mask. With `need_lse` the tile runs unfused products instead, which also give the
    log-sum-exp. A tile whose union is wider than UNION_WIDTH_FACTOR * K falls back to per-query
    gathers (`_per_query_forward`), which do less arithmetic there. With `out` (q's shape and dtype,
    contiguous in its last two dims, such as a block of the fused prefill's output) the result is
    written there.
    """
    batch, queries, heads, head_dim = q.shape
    keys, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    slots = indices.shape[-1]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, queries, heads, dtype=torch.float32, device=q.device) if need_lse else None
    present = torch.zeros(keys + 1, dtype=torch.bool, device=q.device)
    # int32 index rows (the fused prefill's buffer) stay int32 here. The tile's masks are set by indexing,
    # which takes either dtype, so no int64 copy of the rows is made.
    position = torch.empty(keys + 1, dtype=indices.dtype, device=q.device)
    tile_rows = torch.arange(UNION_TILE, dtype=indices.dtype, device=q.device).unsqueeze(1)
    for b in range(batch):
        # [HKV, S, D] views; for the Hugging Face cache layout these are contiguous.
        k_heads, v_heads = k[b].transpose(0, 1), v[b].transpose(0, 1)
        for start in range(0, queries, UNION_TILE):
            stop = min(start + UNION_TILE, queries)
            tile = stop - start
            idx = indices[b, start:stop]
            valid = idx >= 0
            slot_keys = torch.where(valid, idx, keys)  # -1 slots go to the spare entry S, in idx's dtype
            present.zero_()
            present[slot_keys.flatten()] = True
            union = present[:keys].nonzero().squeeze(1)
            width = union.numel()
            if width > UNION_WIDTH_FACTOR * slots or width == 0:
                chunk_out, chunk_lse = _per_query_forward(
                    q[b : b + 1, start:stop], k[b : b + 1], v[b : b + 1], indices[b : b + 1, start:stop].long(), scale,
                    chunk_size,
                )
                out[b, start:stop] = chunk_out[0]
                if lse is not None:
                    lse[b, start:stop] = chunk_lse[0]
                continue
            span = int(union[-1]) + 1
            if width >= PREFIX_SHARE * span:
                # The union covers most of the prefix [0, span), so attend over the prefix in place, with
                # the few unselected keys masked, instead of gathering. U is then the prefix.
                width = span
                keep = torch.zeros(tile, width + 1, dtype=torch.bool, device=q.device)
                keep[tile_rows[:tile], torch.clamp_max(slot_keys, width)] = True
                keep = keep[:, :width]  # [Tq, U]
                k_sel, v_sel = k_heads[:, :width], v_heads[:, :width]
            else:
                position[union] = torch.arange(width, dtype=position.dtype, device=q.device)
                position[keys] = width
                keep = torch.zeros(tile, width + 1, dtype=torch.bool, device=q.device)
                keep[tile_rows[:tile], position[slot_keys]] = True
                keep = keep[:, :width]  # [Tq, U]
                k_sel, v_sel = k_heads.index_select(1, union), v_heads.index_select(1, union)  # [HKV, U, D]
            # [Tq, H, D] viewed as [Tq, HKV, G, D], the layout of the tile's output rows too.
            out_tile = out[b, start:stop].view(tile, kv_heads, groups, head_dim)
            if lse is None:
                # SDPA reads a strided view of q as [HKV, G, Tq, D], and its output is copied once into out,
                # without the [HKV, Tq * G, D] copies that the unfused products need.
                q_heads = q[b, start:stop].view(tile, kv_heads, groups, head_dim).permute(1, 2, 0, 3)
                out_tile.copy_(_fused_tile(q_heads, k_sel, v_sel, keep, scale).permute(2, 0, 1, 3))
                continue
            # [Tq, H, D] -> [HKV, Tq * G, D], rows ordered (t, g)
            q_tile = q[b, start:stop].reshape(tile, kv_heads, groups, head_dim).permute(1, 0, 2, 3).reshape(kv_heads, tile * groups, head_dim)
            tile_out, tile_lse = _unfused_tile(q_tile.float(), k_sel.float(), v_sel.float(), keep, groups, scale)
            lse[b, start:stop] = tile_lse.permute(1, 0, 2).reshape(tile, heads)
            # [HKV, Tq * G, D] -> [Tq, HKV, G, D]
            out_tile.copy_(tile_out.view(kv_heads, tile, groups, head_dim).permute(1, 0, 2, 3))
    return out, lse


def _fused_tile(q_heads, k_sel, v_sel, keep, scale: float) -> torch.Tensor:
    """Return out [HKV, G, Tq, D] (fp32) of SDPA for q_heads [HKV, G, Tq, D] over k_sel, v_sel [HKV, U, D].

    Query t may attend union key u when keep[t, u]. A query without keys gets 0. The G query heads of a
    kv head run as SDPA heads that share its keys (`enable_gqa`), so the [Tq, U] mask broadcasts over
    them. Repeating it G times as [Tq * G, U] rows took 12 MiB per tile at Qwen3-4B shapes with 8k keys
    on the CPU, against 3 to 4 MiB this way, for about 5% more time per tile.
    NOTE: SDPA with both enable_gqa and a mask has only run on the CPU here, not on a GPU.
    """
    dtype = torch.float32
    out = torch.nn.functional.scaled_dot_product_attention(
        q_heads.to(dtype), k_sel.to(dtype).unsqueeze(1), v_sel.to(dtype).unsqueeze(1), attn_mask=keep, scale=scale,
        enable_gqa=True,
    )
    empty = ~keep.any(dim=-1)
    if bool(empty.any()):
        # SDPA returns NaN for a row whose keys are all masked out.
        out[:, :, empty] = 0.0
    return out


def _unfused_tile(q_tile, k_sel, v_sel, keep, groups: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return out [HKV, Tq * G, D] and lse [HKV, Tq, G] by explicit products, for `_fused_tile`'s inputs
    in fp32. The lse is +inf for a query without keys."""
    kv_heads, rows, _ = q_tile.shape
    tile, width = keep.shape
    logits = torch.bmm(q_tile, k_sel.transpose(1, 2)).mul_(scale).view(kv_heads, tile, groups, width)
    logits.masked_fill_(~keep[None, :, None, :], float("-inf"))
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(logits - row_max)
    denom = probs.sum(dim=-1, keepdim=True)
    values = torch.bmm(probs.view(kv_heads, rows, width), v_sel).view(kv_heads, tile, groups, -1)
    tile_out = torch.where(denom > 0, values / denom.clamp_min(1e-30), torch.zeros_like(values))
    tile_lse = torch.where(denom > 0, row_max + denom.log(), torch.full_like(denom, float("inf")))
    return tile_out.view(kv_heads, rows, -1), tile_lse.squeeze(-1)


def _full_decode(q, k, v, indices, scale: float) -> torch.Tensor:
    """Return out [B, 1, H, D] for a decode step without autograd whose K slots are all valid.

    The selected rows are gathered, then one SDPA call without a mask runs [B, HKV, G, D] against
    [B, HKV, K, D], in place of the masked products.
    """
    batch, _, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    slots = indices.shape[-1]
    k_rows, k_strides = _row_view(k)
    v_rows, v_strides = _row_view(v)
    # Rows ordered (b, n, k): [B, 1, HKV, K, D] viewed as [B, HKV, K, D].
    shape = (batch, kv_heads, slots, head_dim)
    k_sel = _gather(k_rows, _row_ids(indices, k_strides, kv_heads), shape)
    v_sel = _gather(v_rows, _row_ids(indices, v_strides, kv_heads), shape)
    q_heads = q.float().view(batch, kv_heads, heads // kv_heads, head_dim)
    out = torch.nn.functional.scaled_dot_product_attention(q_heads, k_sel, v_sel, scale=scale)
    return out.reshape(batch, 1, heads, head_dim).to(q.dtype)


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
    Without autograd and lse, fp32 CPU inputs of the common head shapes go to the C++ kernel of
    `dsa.ops.sparse_attention.cpu`, which reads each query's rows in place.
    """
    check_attention_inputs(q, k, v, indices)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} is invalid; expected an integer >= 1.")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not needs_grad and not return_lse and sparse_attention_cpu_applies(q, k, v):
        return sparse_attention_cpu(q, k, v, indices, scale)
    if not needs_grad and q.shape[1] == 1 and not return_lse and bool((indices >= 0).all()):
        return _full_decode(q, k, v, indices, scale)
    if not needs_grad and q.shape[1] > 1:
        out, lse = _union_forward(q, k, v, indices, scale, chunk_size, need_lse=return_lse)
    else:
        out, lse = _SparseAttention.apply(q, k, v, indices, scale, chunk_size)
    return (out, lse) if return_lse else out
