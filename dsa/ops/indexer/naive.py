"""Readable reference for the lightning indexer score.

    I[b, t, s] = sum_j  w[b, t, j] * HI^-0.5 * DI^-0.5 * ReLU(q[b, t, j] . k[b, s])

The ReLU acts per head before the weighted sum, the head weights may be negative, and everything is
computed in fp32 whatever the input dtype, because a 128-term fp16 dot product of activations around 30
already exceeds fp16's maximum of 65504.

With score_dtype=torch.bfloat16 the product q . k is the one a bf16 matrix product returns: q and k
rounded to bf16, the dot product summed in fp32, the logit rounded to bf16. ReLU and the weighted sum
stay in fp32. bf16 has fp32's exponent range, so it cannot overflow where fp16 does.
"""

from __future__ import annotations

import torch

from dsa.ops._checks import check_indexer_inputs, check_score_dtype


def index_scores_reference(
    q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor, score_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Return index scores [B, T, S] in fp32 for q_idx [B, T, HI, DI], k_idx [B, S, DI], weights [B, T, HI]."""
    check_indexer_inputs(q_idx, k_idx, weights)
    check_score_dtype(score_dtype)
    heads, head_dim = q_idx.shape[2], q_idx.shape[3]
    scale = heads**-0.5 * head_dim**-0.5
    q_rounded, k_rounded = q_idx.to(score_dtype).float(), k_idx.to(score_dtype).float()
    logits = torch.einsum("bthd,bsd->bths", q_rounded, k_rounded).to(score_dtype).float()
    return torch.einsum("bth,bths->bts", weights.float() * scale, logits.relu())
