"""Chunked PyTorch top-k selection, equal to `select_topk_reference` (same sets, same order).

Scores exist for one chunk of queries at a time ([B, Tc, S] fp32), so the full [T, S] matrix is never
held. Each row takes `torch.topk`'s set when no score equal to its k-th largest is left out. Rows with
a tie across the boundary (and every row when sinks or a local window force keys) follow the
reference's rule without sorting: every score above the k-th largest value, then the lowest-index keys
equal to it until the row has k keys.
"""

from __future__ import annotations

from typing import Callable

import torch

from dsa.ops._checks import check_index_out, check_indexer_inputs, check_score_dtype, resolve_mask_args
from dsa.ops.indexer.cpu import cpu_kernel_applies
from dsa.ops.indexer.torch import FEW_QUERY_HEADS, index_scores_chunk, kernel_layout
from dsa.ops.masks import forced_keys, visible_keys
from dsa.ops.topk.cpu import (
    select_chunk_cpu,
    select_few_cpu,
    select_few_cpu_applies,
    select_rows_cpu,
    select_rows_cpu_applies,
)
from dsa.ops.topk.naive import check_selection_args

ScoresFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def select_topk_torch(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    weights: torch.Tensor,
    top_k: int,
    *,
    q_start: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    sink_tokens: int = 0,
    local_tokens: int = 0,
    chunk_size: int = 256,
    score_dtype: torch.dtype = torch.float32,
    scores_fn: ScoresFn | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return indices [B, T, K] (int64) for q_idx [B, T, HI, DI], k_idx [B, S, DI], weights [B, T, HI].

    With `out` (int64 or int32 [B, T, K] on q_idx's device, unit stride along K) the indices are
    written there and `out` is returned; the fused prefill passes one int32 buffer for all its blocks.
    The CPU kernels then write their rows straight into it.

    `score_dtype` torch.bfloat16 runs the q . k product of the scores in bf16, as
    `index_scores_reference(..., score_dtype=torch.bfloat16)` defines it; k_idx already in bf16 (a
    bf16 indexer key cache) is then read without a copy.
    `scores_fn(q_chunk, k_idx_t, w_chunk, first_position)` computes one chunk's scores [B, Tc, S'] from
    q and k in `score_dtype`; the default is the PyTorch `index_scores_chunk`. The Triton backend passes
    its fused kernel here.
    """
    check_indexer_inputs(q_idx, k_idx, weights)
    check_selection_args(top_k, sink_tokens, local_tokens)
    check_score_dtype(score_dtype)
    batch, queries, keys = q_idx.shape[0], q_idx.shape[1], k_idx.shape[1]
    q_start = resolve_mask_args(queries, keys, batch, q_start, key_padding_mask, attention_mask)
    width = min(top_k, keys)
    plain = sink_tokens == 0 and local_tokens == 0
    few_queries = queries * q_idx.shape[2] <= FEW_QUERY_HEADS
    if out is not None:
        check_index_out(out, (batch, queries, width), q_idx.device)
    if scores_fn is None and plain and keys > width and few_queries and q_idx.device.type == "cpu":
        # Decode: one C++ call scores the keys in the cache's own layout and selects each row. The masks
        # are checked last, since each check reads the whole mask.
        k_score = k_idx.to(score_dtype)
        if select_few_cpu_applies(q_idx, k_score) and _sees_all(key_padding_mask) and _sees_all(attention_mask):
            few = select_few_cpu(q_idx, k_score, weights, q_start, width)
            return few if out is None else out.copy_(few)
    if scores_fn is None:
        scores_fn = _torch_scores

    k_idx_t = k_idx.to(score_dtype).transpose(1, 2)  # [B, DI, S], a view: bmm reads it without a copy
    if scores_fn is _torch_scores:
        # The fused CPU kernel reads this view in place; keys of other strides are copied once for all chunks.
        k_idx_t = kernel_layout(k_idx_t, min(chunk_size, queries), q_idx.shape[2])
    if out is None:
        out = torch.empty(batch, queries, width, dtype=torch.int64, device=q_idx.device)
    # Chunks of many queries whose scores the fused CPU kernel would compute (see index_scores_chunk).
    chunk_kernel = (
        plain and scores_fn is _torch_scores and min(chunk_size, queries) * q_idx.shape[2] > FEW_QUERY_HEADS
        and cpu_kernel_applies(q_idx, k_idx_t)
    )
    for start in range(0, queries, chunk_size):
        stop = min(start + chunk_size, queries)
        first = q_start + start
        # Keys beyond the last query's position are invisible to the whole chunk: skip them.
        span = q_start + stop
        rows_mask = None if attention_mask is None else attention_mask[:, start:stop, :span]
        padding = _crop(key_padding_mask, span)
        q_positions = torch.arange(first, span, device=q_idx.device)
        if span <= width and key_padding_mask is None and attention_mask is None:
            # Every visible key fits: the selection is the causal prefix, no scores needed. Built from two
            # aranges, without [B, Tc, S'] masks whose size changes with every chunk.
            slots = torch.arange(width, device=q_idx.device)
            out[:, start:stop] = torch.where(slots > q_positions.unsqueeze(-1), -1, slots)
            continue
        if chunk_kernel and padding is None and rows_mask is None:
            # Long rows without masks: the kernel keeps each row's candidates, not the chunk's scores.
            found = select_chunk_cpu(
                q_idx[:, start:stop], k_idx_t[:, :, :span], weights[:, start:stop], first, width, out=out[:, start:stop]
            )
            if found is not None:
                continue
        scores = scores_fn(q_idx[:, start:stop].to(score_dtype), k_idx_t[:, :, :span], weights[:, start:stop], first)
        if plain:
            _hide_invisible(scores, first, padding, rows_mask)
            _topk_rows(scores, width, out=out[:, start:stop])
            continue
        visible = visible_keys(q_positions, span, padding, batch, rows_mask)
        forced = forced_keys(visible, q_positions, padding, sink_tokens, local_tokens)
        out[:, start:stop] = _ascending_indices(_choose(scores, visible, forced, width), width)
    return out


def _sees_all(mask: torch.Tensor | None) -> bool:
    """True when a mask hides no key (None, or all True), so that the causal rule alone decides."""
    return mask is None or bool(mask.all())


def _hide_invisible(
    scores: torch.Tensor, first_position: int, key_padding_mask: torch.Tensor | None, rows_mask: torch.Tensor | None
) -> None:
    """Set the scores [B, Tc, S'] of keys a row cannot see to -inf, in place.

    Row t may attend keys up to first_position + t, and S' = first_position + Tc, so the causal limit
    only touches the last Tc columns: an upper triangle, not a [Tc, S'] mask.
    """
    tile = scores.shape[1]
    future = torch.ones(tile, tile, dtype=torch.bool, device=scores.device).triu_(diagonal=1)
    scores[:, :, first_position:].masked_fill_(future, float("-inf"))
    if key_padding_mask is not None:
        scores.masked_fill_(~key_padding_mask.unsqueeze(1), float("-inf"))
    if rows_mask is not None:
        scores.masked_fill_(~rows_mask, float("-inf"))


def _topk_rows(scores: torch.Tensor, width: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Return ascending indices [B, Tc, width] (-1 after the last) for scores [B, Tc, S'] whose invisible
    keys are already -inf, without the [B, Tc, S'] masks and cumulative sums of `_choose`. With `out`
    ([B, Tc, width] int64 or int32, unit stride along width) they are written there.

    fp32 scores on the CPU go to the C++ kernel (`dsa.ops.topk.cpu`), which writes into `out` directly.
    Otherwise each row takes `topk`'s set, which is the tie rule's set unless a score equal to the row's
    k-th largest is left out. Only such rows go through `_choose`. A row with fewer than `width` visible
    keys (its k-th largest is -inf) keeps all of them.
    """
    count = min(width, scores.shape[-1])
    if out is None:
        out = torch.empty(*scores.shape[:-1], width, dtype=torch.int64, device=scores.device)
    if select_rows_cpu_applies(scores):
        # The C++ kernel applies the same rule row by row, without [Tc, S'] temporaries.
        select_rows_cpu(scores, count, out=out[..., :count])
    else:
        out[..., :count] = _topk_rows_torch(scores, count)
    if count < width:
        out[..., count:] = -1
    return out


def _topk_rows_torch(scores: torch.Tensor, count: int) -> torch.Tensor:
    """`_topk_rows`'s PyTorch path: ascending indices [B, Tc, count] with count <= S'."""
    span = scores.shape[-1]
    few_rows = scores.shape[0] * scores.shape[1] <= FEW_ROWS
    if not few_rows and span >= SAMPLED_MIN_SPAN * count:
        ascending = _sampled_select(scores, count)
        if ascending is not None:
            return ascending
    found = _sampled_topk(scores, count) if few_rows and span >= SAMPLED_MIN_SPAN * count else None
    values, indices = found if found is not None else scores.topk(count, dim=-1, sorted=False)
    kth = values.amin(dim=-1, keepdim=True)
    empty = torch.isneginf(values)
    if bool(empty.any()):
        # Empty slots sort last as index S', then become -1.
        indices = torch.where(empty, span, indices).sort(dim=-1).values
        indices = indices.masked_fill_(indices == span, -1)
    elif few_rows:
        # A few rows (decode): sorting count indices beats a pass over S' booleans.
        indices = indices.sort(dim=-1).values
    else:
        # Every row contains `count` keys, so listing a row mask's True positions orders them faster than a sort.
        chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, indices, True)
        indices = chosen.nonzero()[:, -1].view(indices.shape)
    tied = ((scores >= kth).sum(dim=-1, keepdim=True) != count) & ~torch.isneginf(kth)
    tied = tied.squeeze(-1)
    if bool(tied.any()):
        rows = scores[tied].unsqueeze(0)  # [1, N, S']
        chosen = _choose(rows, ~torch.isneginf(rows), None, count)
        indices[tied] = _ascending_indices(chosen, count)[0]
    return indices


# Rows per call up to which `_sampled_topk` runs row by row (decode steps, small batches).
FEW_ROWS = 8
# A row needs at least this many times `count` keys before sampling pays off.
SAMPLED_MIN_SPAN = 8
# Every SAMPLE_STRIDE-th score forms the sample, whose bound aims at SAMPLE_MARGIN times `count` candidates.
SAMPLE_STRIDE = 16
SAMPLE_MARGIN = 1.25


def _sampled_topk(scores: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return topk's (values, indices) [B, Tc, count] for a few long rows, or None to fall back.

    A full `topk` over S' keys per row costs about as much as scoring them. Instead, the k-th largest of
    every SAMPLE_STRIDE-th score is a lower bound, with k sized for about SAMPLE_MARGIN * count keys at
    or above it. When at least `count` keys reach the bound, the row's top `count` are among them, so the
    exact topk runs on those candidates only. When fewer or too many keys reach it, this returns None
    and the caller runs the full topk, so the result never depends on the sample.
    """
    batch, tile, span = scores.shape
    rows = scores.reshape(batch * tile, span)
    sample = rows[:, ::SAMPLE_STRIDE]
    rank = min(sample.shape[1], int(SAMPLE_MARGIN * count / SAMPLE_STRIDE) + 16)
    bound = sample.topk(rank, dim=-1, sorted=False).values.amin(dim=-1)
    if bool(torch.isneginf(bound).any()):
        return None
    values = torch.empty(rows.shape[0], count, dtype=scores.dtype, device=scores.device)
    indices = torch.empty(rows.shape[0], count, dtype=torch.int64, device=scores.device)
    for row in range(rows.shape[0]):
        candidates = (rows[row] >= bound[row]).nonzero().squeeze(-1)
        if not count <= candidates.numel() <= span // 2:
            return None
        row_values, picked = rows[row, candidates].topk(count, sorted=False)
        values[row], indices[row] = row_values, candidates[picked]
    return values.view(batch, tile, count), indices.view(batch, tile, count)


def _sampled_select(scores: torch.Tensor, count: int) -> torch.Tensor | None:
    """Return ascending indices [B, Tc, count] of each row's `count` largest scores, or None to fall back.

    The many-row counterpart of `_sampled_topk` (prefill chunks): a `topk` over all S' keys of a row
    costs several times the row's scores. The bound from every SAMPLE_STRIDE-th score admits about
    SAMPLE_MARGIN * count candidates per row. The k-th largest score is found among those, and the keys
    at or above it, listed in key order, are the selection. A row where other keys tie the k-th largest
    score follows the tie rule among its candidates, which contain every key at or above it. Returns
    None, so that the caller runs the full `topk`, when a bound admits fewer than `count` or more than
    half of a row's keys, or when a row's sample bound is -inf (too many invisible keys).
    """
    batch, tile, span = scores.shape
    rows = scores.reshape(batch * tile, span)
    sample = rows[:, ::SAMPLE_STRIDE]
    rank = min(sample.shape[1], int(SAMPLE_MARGIN * count / SAMPLE_STRIDE) + 16)
    bound = sample.topk(rank, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    if bool(torch.isneginf(bound).any()):
        return None
    candidates = (rows >= bound).nonzero()  # [N, 2] (row, key), rows ascending, keys ascending within a row
    row_of, key_of = candidates[:, 0], candidates[:, 1]
    counts = torch.bincount(row_of, minlength=rows.shape[0])
    if int(counts.min()) < count or int(counts.max()) > span // 2:
        return None
    values = rows[row_of, key_of]
    # Candidates packed into [N, widest] (-inf padding), to find each row's k-th largest.
    starts = counts.cumsum(0) - counts
    slot = torch.arange(values.numel(), device=scores.device) - starts.repeat_interleave(counts)
    packed = torch.full((rows.shape[0], int(counts.max())), float("-inf"), dtype=values.dtype, device=scores.device)
    packed[row_of, slot] = values
    kth = packed.topk(count, dim=-1, sorted=False).values.amin(dim=-1)
    keep = values >= kth[row_of]
    tied = torch.bincount(row_of[keep], minlength=rows.shape[0]) != count
    if not bool(tied.any()):
        return key_of[keep].view(batch, tile, count)
    # Rows where several keys equal the k-th largest score follow the tie rule: every key above it,
    # then the lowest-index keys equal to it. Every such key is a candidate (kth >= bound), and a
    # row's candidates are in key order, so a running count of the equal ones ranks them by index.
    # bf16 logits make such ties common: a quarter of the rows at 64k keys.
    kth_of = kth[row_of]
    above = values > kth_of
    equal = (values == kth_of).long()
    missing = count - torch.bincount(row_of[above], minlength=rows.shape[0])
    equal_rank = equal.cumsum(0)
    equal_rank -= (equal_rank - equal)[starts].repeat_interleave(counts)  # 1, 2, ... within each row
    keep = above | ((equal == 1) & (equal_rank <= missing[row_of]))
    return key_of[keep].view(batch, tile, count)


def _torch_scores(q_idx: torch.Tensor, k_idx_t: torch.Tensor, weights: torch.Tensor, first_position: int) -> torch.Tensor:
    return index_scores_chunk(q_idx, k_idx_t, weights)


def _crop(key_padding_mask: torch.Tensor | None, span: int) -> torch.Tensor | None:
    return None if key_padding_mask is None else key_padding_mask[:, :span]


def _choose(scores: torch.Tensor, visible: torch.Tensor, forced: torch.Tensor | None, width: int) -> torch.Tensor:
    """Return [B, Tc, S'] bool marking each row's min(width, visible) chosen keys."""
    scores = scores.masked_fill(~visible, float("-inf"))
    if forced is not None:
        scores = scores.masked_fill(forced, float("inf"))
    count = min(width, scores.shape[-1])
    # kth: the count-th largest score per row; -inf when the row has fewer visible keys than count.
    kth = scores.topk(count, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    above = (scores > kth) & visible
    tied = (scores == kth) & visible
    missing = count - above.sum(dim=-1, keepdim=True)
    return above | (tied & (tied.cumsum(dim=-1) <= missing))


def _ascending_indices(chosen: torch.Tensor, width: int) -> torch.Tensor:
    """Turn a chosen mask [B, Tc, S'] into indices [B, Tc, width], ascending, -1 in empty slots.

    Each chosen key's slot is its rank among the row's chosen keys (a cumulative sum), so one scatter
    lists them in order; unchosen keys go to an extra column that is dropped.
    """
    span = chosen.shape[-1]
    count = min(width, span)
    slots = torch.where(chosen, chosen.cumsum(dim=-1) - 1, count)
    out = torch.full((*chosen.shape[:-1], count + 1), -1, dtype=torch.int64, device=chosen.device)
    out.scatter_(-1, slots, torch.arange(span, device=chosen.device).expand_as(slots))
    indices = out[..., :count]
    if count < width:
        indices = torch.nn.functional.pad(indices, (0, width - count), value=-1)
    return indices
