"""Top-k selection with the reference's tie rule on the CPU (the C++ kernels `select_rows`, `select_chunk`
and `select_few` of dsa/ops/_cpu.cpp).

For each row of scores `select_rows` samples every 16th score, takes a bound that about 1.25 * count
keys reach, finds the count-th largest among the keys at or above the bound, and lists the selected
keys in key order. That is the rule and sample of `_sampled_select` in `dsa.ops.topk.torch`, without
its [Tc, S] temporaries, for rows of at least 3 * count keys (8 * count there). Rows where the bound
admits fewer than count or more than half of the keys use every key as a candidate, so the result
never depends on the sample.

`select_chunk` is a chunk's whole selection without its [B, Tc, S'] scores: the sample's scores give
each row its bound, then the keys are scored one block at a time and only the candidates at or above the
bound are kept.

`select_few` is a decode step's whole selection: index scores from the keys-major indexer key cache,
then the same row selection, in one call.
"""

from __future__ import annotations

import torch

from dsa.ops._checks import check_index_out
from dsa.ops._cpu import cpu_kernels


def select_rows_cpu_applies(scores: torch.Tensor) -> bool:
    """True when `select_rows_cpu` can take scores: fp32 on the CPU, and the kernels build."""
    return scores.device.type == "cpu" and scores.dtype == torch.float32 and cpu_kernels() is not None


def select_rows_cpu(scores: torch.Tensor, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Return indices [..., count] (int64, ascending, -1 after a row's last visible key) of each row's
    `count` largest scores [..., S'] (invisible keys -inf), ties at the boundary to the lowest index.

    With `out` (int64 or int32, scores' leading shape by count, unit stride along count, such as a slice
    of a larger buffer), the kernel writes there and returns it, and no result tensor is allocated.
    Callers check `select_rows_cpu_applies` first.
    """
    kernels = cpu_kernels()
    assert kernels is not None, "call select_rows_cpu_applies() before select_rows_cpu()"
    span = scores.shape[-1]
    if out is None:
        out = torch.empty(*scores.shape[:-1], count, dtype=torch.int64, device=scores.device)
    check_index_out(out, (*scores.shape[:-1], count), torch.device("cpu"))
    kernels.select_rows(scores.detach().reshape(-1, span), count, _kernel_rows(out))
    return out


def _kernel_rows(out: torch.Tensor) -> torch.Tensor:
    """View `out` [..., count] as the [R, count] or [B, Tc, count] rows the kernels write."""
    if out.dim() in (2, 3):
        return out
    if out.dim() == 1 or out.is_contiguous():
        return out.view(-1, out.shape[-1])
    raise ValueError(
        f"out of shape {tuple(out.shape)} and strides {out.stride()} is invalid: an out tensor of more than 3 dims "
        "must be contiguous. Pass a contiguous tensor, or one of 2 or 3 dims."
    )


FEW_HEAD_DIMS = (16, 32, 64, 128)
"""Indexer head dims `select_few_cpu` is compiled for."""


def select_few_cpu_applies(q_idx: torch.Tensor, k_idx: torch.Tensor) -> bool:
    """True when `select_few_cpu` can take q_idx [B, T, HI, DI] and k_idx [B, S, DI]. That needs CPU
    tensors, fp32 or bf16 keys with unit stride along DI, a compiled DI and HI a multiple of 4. It also
    needs no gradient and a build of the kernels."""
    if q_idx.device.type != "cpu" or k_idx.dtype not in (torch.float32, torch.bfloat16) or k_idx.stride(-1) != 1:
        return False
    if q_idx.shape[-1] not in FEW_HEAD_DIMS or q_idx.shape[2] % 4:
        return False
    if torch.is_grad_enabled() and (q_idx.requires_grad or k_idx.requires_grad):
        return False
    return cpu_kernels() is not None


def select_few_cpu(q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Return indices [B, T, count] (int64, ascending, -1 after a row's last visible key) of the `count`
    largest index scores of each query, ties to the lowest index. Query t may attend keys 0 .. first + t.

    For a few queries (decode): the kernel scores keys-major straight from k_idx [B, S, DI] (the indexer
    key cache, fp32 or bf16, which sets the product's dtype as in `index_scores_chunk`) and selects
    each row, in one call. Callers check `select_few_cpu_applies` first.
    """
    kernels = cpu_kernels()
    assert kernels is not None, "call select_few_cpu_applies() before select_few_cpu()"
    heads, head_dim = q_idx.shape[2], q_idx.shape[3]
    scale = heads**-0.5 * head_dim**-0.5
    q = q_idx.detach().to(k_idx.dtype).float()
    return kernels.select_few(q, k_idx.detach(), weights.detach().float() * scale, int(first), int(count))


def select_chunk_cpu(
    q_idx: torch.Tensor,
    k_idx_t: torch.Tensor,
    weights: torch.Tensor,
    first: int,
    count: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Return indices [B, Tc, count] (int64, ascending) of the `count` largest index scores of each query,
    ties to the lowest index, where query t may attend keys 0 .. first + t of k_idx_t [B, DI, S'] (the
    scores of `index_scores_chunk_cpu`, which sets the keys' layouts and dtypes). Returns None when a
    query may attend fewer than 3 * count keys, and the caller then computes the chunk's scores.
    With `out` (as for `select_rows_cpu`) the kernel writes there and returns it.
    Callers check `dsa.ops.indexer.cpu.cpu_kernel_applies` first.
    """
    kernels = cpu_kernels()
    assert kernels is not None, "call cpu_kernel_applies() before select_chunk_cpu()"
    heads, head_dim = q_idx.shape[2], q_idx.shape[3]
    scale = heads**-0.5 * head_dim**-0.5
    q = q_idx.detach().to(k_idx_t.dtype).float()
    if out is None:
        out = torch.empty(q_idx.shape[0], q_idx.shape[1], count, dtype=torch.int64, device=q_idx.device)
    check_index_out(out, (q_idx.shape[0], q_idx.shape[1], count), torch.device("cpu"))
    done = kernels.select_chunk(q, k_idx_t.detach(), weights.detach().float() * scale, int(first), int(count), out)
    return out if done else None
