"""The indexer's own RoPE table, built from the host model's `rope_theta` and rope scaling.

Host models size their rotary tables for their attention head dim; the indexer rotates only its first R
dims, so it gets a table of R/2 frequencies computed by transformers' own RoPE initialisers
(`ROPE_INIT_FUNCTIONS`: linear, dynamic, yarn, longrope, llama3, ...) with the head dim set to R.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from dsa.ops.rope import rope_inverse_frequencies


def host_rope_parameters(host_config: Any) -> dict[str, Any]:
    """Return the host's rope parameters for full-attention layers (rope_theta, rope_type, scaling keys)."""
    parameters = getattr(host_config, "rope_parameters", None) or {}
    if "full_attention" in parameters:  # per-layer-type parameters (Gemma 3)
        parameters = parameters["full_attention"]
    parameters = dict(parameters)
    if "rope_theta" not in parameters:
        parameters["rope_theta"] = getattr(host_config, "rope_theta", None) or 10000.0
    parameters.setdefault("rope_type", "default")
    return parameters


def indexer_rope_table(host_config: Any, rope_dim: int, rope_theta: float | None = None) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [R/2] fp32, attention_scaling) for the indexer's rope dims."""
    parameters = host_rope_parameters(host_config)
    if rope_theta is not None:
        parameters["rope_theta"] = rope_theta
    rope_type = parameters["rope_type"]
    if rope_dim == 0:
        return torch.zeros(0), 1.0
    if rope_type == "default":
        return rope_inverse_frequencies(rope_dim, float(parameters["rope_theta"])), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"host rope_type {rope_type!r} is unknown to transformers' ROPE_INIT_FUNCTIONS; cannot build the indexer table.")
    proxy = copy.deepcopy(host_config)
    proxy.head_dim = rope_dim
    proxy.partial_rotary_factor = 1.0
    proxy.rope_parameters = parameters
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](proxy, device=torch.device("cpu"))
    if inv_freq.shape != (rope_dim // 2,):
        raise RuntimeError(f"rope type {rope_type!r} returned {tuple(inv_freq.shape)} frequencies; expected ({rope_dim // 2},).")
    return inv_freq.float(), float(attention_scaling)
