"""The lightning indexer as an `nn.Module`: projections, key LayerNorm and partial RoPE.

For each token it produces HI query heads of width DI, one key of width DI shared by all indexer heads,
and HI head weights, from the attention block's normalised hidden state x [B, T, C]:

    q_idx   = wq(x) (or wq_b(RMSNorm(wq_a(x))) with a low-rank query), RoPE on the first R dims
    k_idx   = LayerNorm(wk(x)) in fp32, RoPE on the first R dims
    weights = weights_proj(x) in fp32, no activation (weights may be negative)

as in DeepSeek-V3.2-Exp's `Indexer` (inference/model.py), with the rotate-half RoPE layout by default.
"""

from __future__ import annotations

import torch
from torch import nn

from dsa.config import DSAConfig
from dsa.ops.rope import apply_partial_rope, rope_cos_sin, rope_inverse_frequencies


class LightningIndexer(nn.Module):
    """Per-layer indexer: maps x [B, T, C] and positions [B, T] to (q_idx, k_idx, weights)."""

    def __init__(
        self,
        hidden_size: int,
        config: DSAConfig,
        inv_freq: torch.Tensor | None = None,
        attention_scaling: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size={hidden_size!r} is invalid; expected an integer >= 1.")
        self.config = config
        heads, head_dim = config.indexer_heads, config.indexer_head_dim
        if config.q_lora_rank is None:
            self.wq = nn.Linear(hidden_size, heads * head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(hidden_size, config.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(config.q_lora_rank, eps=1e-6)
            self.wq_b = nn.Linear(config.q_lora_rank, heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(hidden_size, heads, bias=False)
        if inv_freq is None:
            inv_freq = rope_inverse_frequencies(config.rope_dim, config.rope_theta or 10000.0)
        if inv_freq.shape != (config.rope_dim // 2,):
            raise ValueError(f"inv_freq has shape {tuple(inv_freq.shape)}; expected [R/2] = ({config.rope_dim // 2},).")
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = attention_scaling

    def project_query(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.q_lora_rank is None:
            return self.wq(hidden)
        return self.wq_b(self.q_norm(self.wq_a(hidden)))

    def project_key(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return the LayerNorm-ed key [B, T, DI] (before RoPE), computed in fp32 and cast back."""
        key = self.wk(hidden)
        return nn.functional.layer_norm(
            key.float(), (key.shape[-1],), self.k_norm.weight.float(), self.k_norm.bias.float(), self.k_norm.eps
        ).to(key.dtype)

    def forward(
        self, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return q_idx [B, T, HI, DI], k_idx [B, T, DI] (both in x's dtype) and weights [B, T, HI] (fp32)
        for hidden x [B, T, C] and absolute positions [B, T]."""
        if hidden.dim() != 3:
            raise ValueError(f"hidden must have shape [B, T, C], got {tuple(hidden.shape)}.")
        if tuple(positions.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"positions has shape {tuple(positions.shape)}; expected [B, T] = {tuple(hidden.shape[:2])}.")
        batch, queries, _ = hidden.shape
        config = self.config
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.attention_scaling)  # [B, T, R/2]
        q_idx = self.project_query(hidden).view(batch, queries, config.indexer_heads, config.indexer_head_dim)
        q_idx = apply_partial_rope(q_idx, cos, sin, config.rope_dim, config.rope_layout)
        k_idx = apply_partial_rope(self.project_key(hidden), cos, sin, config.rope_dim, config.rope_layout)
        weights = self.weights_proj(hidden).float()
        return q_idx, k_idx, weights
