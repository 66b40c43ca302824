"""Sparse attention forward on the CPU (the C++ kernel `sparse_attention` of dsa/ops/_cpu.cpp).

Each query reads only the key and value rows its index row lists, in place in the cache, with the
softmax in registers and scratch of K floats per head: no gathered [T, K, D] copies, no masks. It
computes what `sparse_attention_reference` computes (without the log-sum-exp), for fp32 inputs and
the common head shapes. `sparse_attention_torch` and the fused prefill take it where it applies.
"""

from __future__ import annotations

import torch

from dsa.ops._cpu import cpu_kernels

# Query heads per kv head and head dims the kernel is compiled for.
SUPPORTED_GROUPS = (1, 2, 3, 4, 8)
SUPPORTED_HEAD_DIMS = (64, 128)

MANY_ROWS_MAX_HEAD_DIM = 64
"""Largest head dim for which blocks of several queries take the kernel rather than the tile-union
forward. Measured on a 2-core AMD EPYC (fp32): at D 64 (SmolLM2-135M) the kernel took 0.077 ms per
query against 0.2 ms for the union forward at 16k tokens of real text, and it also won on random
index sets. At D 128 with HKV 8 (Qwen3-4B) on random index sets at 8k, a query gathers 16 MiB of
rows, and the kernel took 1.5 ms per query against 1.1 ms for the union's streamed products. After
the four-key logits and the tile order, on a 2-core Intel Xeon, it still took 3.7 s against 2.5 s for
the attention of that 8k prefill. A decode step takes the kernel at every supported shape (5.2
against 12.3 ms at Qwen3-4B's, 32k keys, AMD EPYC)."""


def sparse_attention_cpu_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Check whether `sparse_attention_cpu` can take q [B, T, H, D], k and v [B, S, HKV, D] and is the
    faster choice. That needs fp32 CPU tensors with unit stride along D and a supported head shape. It
    also needs one query or a head dim of at most MANY_ROWS_MAX_HEAD_DIM, no gradient, and a build."""
    if q.device.type != "cpu" or any(t.dtype != torch.float32 for t in (q, k, v)):
        return False
    if q.shape[1] > 1 and q.shape[3] > MANY_ROWS_MAX_HEAD_DIM:
        return False
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        return False
    if q.shape[2] % k.shape[2] or q.shape[2] // k.shape[2] not in SUPPORTED_GROUPS or q.shape[3] not in SUPPORTED_HEAD_DIMS:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return False
    return cpu_kernels() is not None


def sparse_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, scale: float) -> torch.Tensor:
    """Return out [B, T, H, D] for q [B, T, H, D], k and v [B, S, HKV, D] and indices [B, T, K].

    The indices are int64 or int32 (read as given), with -1 in empty slots, and a row without keys gives
    0. Callers check `sparse_attention_cpu_applies` first."""
    kernels = cpu_kernels()
    assert kernels is not None, "call sparse_attention_cpu_applies() before sparse_attention_cpu()"
    if indices.dtype != torch.int32:
        indices = indices.long()
    return kernels.sparse_attention(q, k, v, indices, float(scale))
