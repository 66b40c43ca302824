"""Partial rotary position embedding for the lightning indexer.

Only the first R dims of each vector rotate; the rest pass through. Two pairings exist:
"rotate_half" pairs dim i with dim i + R/2 (NeoX and Llama style, DeepSeek-V3.2's indexer since its fix of
2025-11-17) and "interleaved" pairs dim 2i with dim 2i + 1 (GPT-J style).
"""

from __future__ import annotations

import torch

from dsa.config import ROPE_LAYOUTS


def rope_inverse_frequencies(rope_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Return the default RoPE inverse frequencies `theta ** (-2i / R)`, shape [R/2], fp32."""
    exponents = torch.arange(0, rope_dim, 2, dtype=torch.float32, device=device) / rope_dim
    return 1.0 / (theta**exponents)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return cos and sin of `positions * inv_freq`, each [..., R/2] in fp32.

    positions: [...] absolute token positions (integer or float).
    inv_freq: [R/2] inverse frequencies.
    attention_scaling: factor some scaled RoPE variants (YaRN, LongRoPE) apply to cos and sin.
    """
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(torch.float32)
    if attention_scaling == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * attention_scaling, angles.sin() * attention_scaling


def apply_partial_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int, layout: str = "rotate_half"
) -> torch.Tensor:
    """Rotate the first `rope_dim` dims of the last axis of `x`; the rest are returned unchanged.

    x: [B, T, ..., DI] with DI >= rope_dim.
    cos, sin: [B, T, R/2], broadcast over any head axes between T and DI.
    Computed in fp32 and returned in x's dtype.
    """
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"rope layout {layout!r} is invalid; expected one of {ROPE_LAYOUTS}.")
    if rope_dim == 0:
        return x
    if rope_dim % 2 or rope_dim > x.shape[-1]:
        raise ValueError(f"rope_dim={rope_dim} is invalid for a last dim of {x.shape[-1]}; expected an even value <= it.")
    if cos.shape[-1] != rope_dim // 2:
        raise ValueError(f"cos has last dim {cos.shape[-1]}, expected rope_dim / 2 = {rope_dim // 2}.")

    # cos, sin: [B, T, R/2] -> [B, T, 1, ..., R/2] to broadcast over head axes of x.
    while cos.dim() < x.dim():
        cos = cos.unsqueeze(-2)
        sin = sin.unsqueeze(-2)
    rotated, untouched = x[..., :rope_dim].float(), x[..., rope_dim:]
    if layout == "rotate_half":
        first, second = rotated[..., : rope_dim // 2], rotated[..., rope_dim // 2 :]
        out = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    else:
        even, odd = rotated[..., 0::2], rotated[..., 1::2]
        out = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    out = out.to(x.dtype)
    # Skipped when every dim rotates: a cat with an empty tensor still copies `out` (decode pays per call).
    return out if rope_dim == x.shape[-1] else torch.cat((out, untouched), dim=-1)
