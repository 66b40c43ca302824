"""Dense-mask oracle for sparse attention: correct and readable, but it does full [T, S] work.

    out[b, t, h] = sum_{s in S_t} softmax_s(scale * q[b, t, h] . k[b, s, h // G]) v[b, s, h // G]

with S_t the valid entries of indices[b, t] (shared by all H heads; G = H / HKV query heads share one
key/value head). A row with no valid index returns 0. Used only as a test oracle, never on a fast path.
"""

from __future__ import annotations

import torch

from dsa.ops._checks import check_attention_inputs


def indices_to_mask(indices: torch.Tensor, keys: int) -> torch.Tensor:
    """Return a bool mask [B, T, S] that is True at the valid entries of indices [B, T, K]."""
    mask = torch.zeros(*indices.shape[:2], keys + 1, dtype=torch.bool, device=indices.device)
    # -1 slots write into the extra column S, which is cut off.
    mask.scatter_(-1, torch.where(indices < 0, keys, indices), True)
    return mask[..., :keys]


def sparse_attention_reference(
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

    `chunk_size` is accepted for signature parity with the fast path and ignored here.
    """
    check_attention_inputs(q, k, v, indices)
    heads, head_dim = q.shape[2], q.shape[3]
    groups = heads // k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale

    keep = indices_to_mask(indices, k.shape[1]).unsqueeze(2)  # [B, T, 1, S]
    k_per_head = k.float().repeat_interleave(groups, dim=2)  # [B, S, H, D]
    v_per_head = v.float().repeat_interleave(groups, dim=2)
    logits = torch.einsum("bthd,bshd->bths", q.float(), k_per_head) * scale
    has_key = keep.any(dim=-1, keepdim=True)
    # Empty rows get finite logits so softmax stays NaN-free; their probabilities are zeroed after.
    logits = logits.masked_fill(~keep, float("-inf")).masked_fill(~has_key, 0.0)
    probs = torch.softmax(logits, dim=-1) * has_key
    out = torch.einsum("bths,bshd->bthd", probs, v_per_head).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.logsumexp(logits, dim=-1).masked_fill(~has_key.squeeze(-1), float("inf"))
    return out, lse
