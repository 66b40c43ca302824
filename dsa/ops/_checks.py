"""Input validation shared by the operators; every error names the argument, the value and what is expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
SCORE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
"""Dtypes the q . k product of the index score may run in."""


def check_score_dtype(score_dtype: torch.dtype) -> None:
    if score_dtype not in SCORE_DTYPES:
        raise ValueError(f"score_dtype={score_dtype!r} is invalid; expected torch.float32 or torch.bfloat16.")


def check_float(name: str, tensor: torch.Tensor, dim: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(tensor.shape)}.")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {tensor.dtype}; expected one of float32, float16, bfloat16.")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}.")


def check_indexer_inputs(q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor) -> None:
    """Check q_idx [B, T, HI, DI], k_idx [B, S, DI], weights [B, T, HI]."""
    check_float("q_idx", q_idx, 4)
    check_float("k_idx", k_idx, 3)
    check_float("weights", weights, 3)
    batch, queries, heads, head_dim = q_idx.shape
    if k_idx.shape[0] != batch or k_idx.shape[2] != head_dim:
        raise ValueError(
            f"k_idx has shape {tuple(k_idx.shape)}; expected [B={batch}, S, DI={head_dim}] to match "
            f"q_idx {tuple(q_idx.shape)}."
        )
    if tuple(weights.shape) != (batch, queries, heads):
        raise ValueError(f"weights has shape {tuple(weights.shape)}; expected [B, T, HI] = {(batch, queries, heads)}.")
    check_same_device(q_idx=q_idx, k_idx=k_idx, weights=weights)


def resolve_mask_args(
    queries: int,
    keys: int,
    batch: int,
    q_start: int | None,
    key_padding_mask: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
) -> int:
    """Check the causal offset and the masks; return q_start (default S - T).

    Query t sits at key position q_start + t and sees keys s <= q_start + t that the padding mask
    [B, S] and the optional attention mask [B, T, S] both keep.
    """
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            raise TypeError(f"attention_mask has dtype {attention_mask.dtype}; expected torch.bool (True = may attend).")
        if tuple(attention_mask.shape) != (batch, queries, keys):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected [B, T, S] = {(batch, queries, keys)}."
            )
    if q_start is None:
        q_start = keys - queries
    if not isinstance(q_start, int) or isinstance(q_start, bool):
        raise TypeError(f"q_start must be an int, got {type(q_start).__name__}.")
    if q_start < 0 or q_start + queries > keys:
        raise ValueError(
            f"q_start={q_start} is invalid for T={queries} queries and S={keys} keys; "
            f"expected 0 <= q_start <= S - T = {keys - queries}."
        )
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask has dtype {key_padding_mask.dtype}; expected torch.bool (True = keep).")
        if tuple(key_padding_mask.shape) != (batch, keys):
            raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected [B, S] = {(batch, keys)}.")
    return q_start


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor) -> None:
    """Check q [B, T, H, D], k and v [B, S, HKV, D], indices [B, T, K] with values in [-1, S)."""
    check_float("q", q, 4)
    check_float("k", k, 4)
    check_float("v", v, 4)
    batch, queries, heads, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; expected equal shapes [B, S, HKV, D].")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k has shape {tuple(k.shape)}; expected [B={batch}, S, HKV, D={head_dim}] to match q {tuple(q.shape)}.")
    kv_heads = k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"q has H={heads} heads, which is not a multiple of HKV={kv_heads} key/value heads.")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}; expected one dtype.")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices has dtype {indices.dtype}; expected torch.int32 or torch.int64.")
    if indices.dim() != 3 or tuple(indices.shape[:2]) != (batch, queries):
        raise ValueError(f"indices has shape {tuple(indices.shape)}; expected [B, T, K] with B={batch}, T={queries}.")
    check_same_device(q=q, k=k, v=v, indices=indices)
    if indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < -1 or high >= k.shape[1]:
            raise ValueError(
                f"indices contain values in [{low}, {high}]; expected -1 (empty slot) or a key index in [0, S={k.shape[1]})."
            )


def check_index_out(out: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    """Raise ValueError unless `out`, a buffer the selection writes, is int64 or int32 on `device`, of
    `shape`, with unit stride along its last dim (its other strides are free: a slice of a larger buffer
    works)."""
    if (
        out.dtype not in (torch.int64, torch.int32)
        or out.device != device
        or tuple(out.shape) != tuple(shape)
        or out.stride(-1) != 1
    ):
        raise ValueError(
            f"out has dtype {out.dtype}, device {out.device}, shape {tuple(out.shape)} and strides {out.stride()}; "
            f"expected int64 or int32 on {device}, shape {tuple(shape)} and unit stride along the last dim."
        )
