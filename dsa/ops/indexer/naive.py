"""Readable reference for the lightning indexer score.

    I[b, t, s] = sum_j  w[b, t, j] * HI^-0.5 * DI^-0.5 * ReLU(q[b, t, j] . k[b, s])

The ReLU acts per head before the weighted sum, the head weights may be negative, and everything is
computed in fp32 whatever the input dtype, because a 128-term fp16 dot product of activations around 30
already exceeds fp16's maximum of 65504.
"""

from __future__ import annotations

import torch

from dsa.ops._checks import check_indexer_inputs


def index_scores_reference(q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Return index scores [B, T, S] in fp32 for q_idx [B, T, HI, DI], k_idx [B, S, DI], weights [B, T, HI]."""
    check_indexer_inputs(q_idx, k_idx, weights)
    heads, head_dim = q_idx.shape[2], q_idx.shape[3]
    scale = heads**-0.5 * head_dim**-0.5
    logits = torch.einsum("bthd,bsd->bths", q_idx.float(), k_idx.float())
    return torch.einsum("bth,bths->bts", weights.float() * scale, logits.relu())
