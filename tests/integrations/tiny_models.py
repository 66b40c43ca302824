"""Tiny random configs of the model families DSA is tested on."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dsa import DSAConfig

BASE = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    intermediate_size=128,
    vocab_size=128,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILY_OVERRIDES: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "mistral": dict(sliding_window=None),
    "phi3": {},
    "gemma3_text": dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "glm4": {},
    "internlm3": {},
    "olmo2": {},
    "granite": {},
    "helium": dict(head_dim=16),
    "stablelm": {},
}

SMALL_DSA = DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=16)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **{**BASE, **FAMILY_OVERRIDES[model_type], **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, BASE["vocab_size"], (batch, length), generator=generator)
