"""Fused lightning indexer scores on the CPU (the C++ kernel `index_scores` of dsa/ops/_cpu.cpp).

`index_scores_chunk_cpu` computes what `dsa.ops.indexer.torch.index_scores_chunk_torch` computes, for
fp32 scores, without writing the per-head logits [Tc * HI, S] to memory: each block of keys stays in
registers from the q . k product through the ReLU to the head-weighted sum. With bf16 keys it runs
the bf16 score product (`score_dtype=torch.bfloat16`): q rounded to bf16, the sum in fp32, each logit
rounded to bf16 before the ReLU, as a bf16 matrix product returns it.
"""

from __future__ import annotations

import torch

from dsa.ops._cpu import cpu_kernels


def cpu_kernel_applies(q_idx: torch.Tensor, k_idx_t: torch.Tensor, require_layout: bool = True) -> bool:
    """True when `index_scores_chunk_cpu` can take these inputs: CPU tensors, fp32 or bf16 keys k_idx_t
    [B, DI, S] with unit stride along S or along DI (unless `require_layout` is False), no gradient
    needed (the kernel has no backward), and the kernel builds."""
    if q_idx.device.type != "cpu" or k_idx_t.dtype not in (torch.float32, torch.bfloat16):
        return False
    if require_layout and not kernel_reads(k_idx_t):
        return False
    if torch.is_grad_enabled() and (q_idx.requires_grad or k_idx_t.requires_grad):
        return False
    return cpu_kernels() is not None


def kernel_reads(k_idx_t: torch.Tensor) -> bool:
    """True when the kernel reads keys k_idx_t [B, DI, S] in place: unit stride along S, or along DI (the
    transposed view of a [B, S, DI] key cache, which it transposes one block of keys at a time)."""
    return k_idx_t.stride(-1) == 1 or k_idx_t.stride(-2) == 1


def index_scores_chunk_cpu(q_idx: torch.Tensor, k_idx_t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Return scores [B, Tc, S] fp32 for q_idx [B, Tc, HI, DI], k_idx_t [B, DI, S] (unit stride along S
    or DI) and weights [B, Tc, HI], as `index_scores_chunk` does: the product in k_idx_t's dtype (fp32 or bf16).
    Callers check `cpu_kernel_applies` first."""
    heads, head_dim = q_idx.shape[2], q_idx.shape[3]
    scale = heads**-0.5 * head_dim**-0.5
    kernels = cpu_kernels()
    assert kernels is not None, "call cpu_kernel_applies() before index_scores_chunk_cpu()"
    # q rounded to the keys' dtype first, as the PyTorch path's product does; exact in fp32 afterwards.
    return kernels.index_scores(q_idx.to(k_idx_t.dtype).float(), k_idx_t, weights.float() * scale)
