"""Which Hugging Face models DSA can be attached to, and why the others are rejected.

DSA plugs into transformers through its attention-function registry, so a model qualifies when its
decoder self-attention modules call `ALL_ATTENTION_FUNCTIONS` with standard causal attention. Layers
whose attention DSA cannot express exactly (sliding windows) are left dense; models with features the
sparse path does not implement (logit soft-capping, attention sinks, MLA, linear-attention hybrids,
encoders) are rejected with the reason.
"""

from __future__ import annotations

import sys

from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

# Model types whose tiny random configs pass the integration tests (tests/integrations/test_families.py).
TESTED_MODEL_TYPES: tuple[str, ...] = (
    "gemma3_text",
    "glm4",
    "granite",
    "helium",
    "internlm3",
    "llama",
    "mistral",
    "olmo2",
    "phi3",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "stablelm",
)

UNSUPPORTED_REASONS: dict[str, str] = {
    "gemma2": "its attention applies logit soft-capping (attn_logit_softcapping), which the sparse path does not implement",
    "vaultgemma": "its attention applies logit soft-capping, which the sparse path does not implement",
    "gpt_oss": "its attention adds learned attention sinks to the softmax, which the sparse path does not implement",
    "deepseek_v2": "it uses multi-head latent attention (MLA), not standard attention",
    "deepseek_v3": "it uses multi-head latent attention (MLA), not standard attention",
    "deepseek_v32": "it already ships its own DeepSeek Sparse Attention indexer",
    "glm_moe_dsa": "it already ships its own DeepSeek Sparse Attention indexer",
    "chatglm": "its remote modeling code bypasses transformers' AttentionInterface",
    "internlm2": "its remote modeling code bypasses transformers' AttentionInterface",
    "llama4": "its chunked local attention layers cannot be expressed by top-k selection",
    "llama4_text": "its chunked local attention layers cannot be expressed by top-k selection",
    "falcon": "it may use ALiBi position biases inside attention, which the sparse path does not implement",
}


class UnsupportedModelError(ValueError):
    """Raised by `convert()` for a model DSA cannot run correctly."""


def _reject(model_type: str, reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"DSA cannot convert model type {model_type!r}: {reason}.")


def _uses_attention_interface(module: nn.Module) -> bool:
    source_module = sys.modules.get(type(module).__module__)
    return source_module is not None and hasattr(source_module, "ALL_ATTENTION_FUNCTIONS")


def find_attention_layers(model: nn.Module) -> list[nn.Module]:
    """Return the decoder self-attention modules (those with an integer `layer_idx`), in layer order."""
    layers = []
    for module in model.modules():
        layer_idx = getattr(module, "layer_idx", None)
        if isinstance(layer_idx, int) and type(module).__name__.endswith("Attention") and hasattr(module, "config"):
            layers.append(module)
    layers.sort(key=lambda module: module.layer_idx)
    return layers


def is_sliding_layer(module: nn.Module, config: object) -> bool:
    """True when a layer attends through a sliding window (such layers stay dense)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and module.layer_idx < len(layer_types):
        return layer_types[module.layer_idx] == "sliding_attention"
    return getattr(module, "sliding_window", None) is not None or getattr(config, "sliding_window", None) is not None


def check_supported(model: nn.Module, allow_untested: bool = False) -> list[nn.Module]:
    """Return the attention modules to convert, or raise `UnsupportedModelError` naming the reason."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if config is None:
        raise _reject(model_type, "it has no `config`; pass a transformers PreTrainedModel")
    if getattr(config, "is_encoder_decoder", False) or model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        raise _reject(model_type, "it is an encoder-decoder model; DSA supports decoder-only causal LMs")
    if model_type in UNSUPPORTED_REASONS:
        raise _reject(model_type, UNSUPPORTED_REASONS[model_type])
    if not type(model).__module__.startswith("transformers."):
        raise _reject(
            model_type,
            f"its modeling code ({type(model).__module__}) is not part of transformers (remote code), so it may "
            "bypass AttentionInterface; load a transformers-native architecture instead",
        )
    if model_type not in TESTED_MODEL_TYPES and not allow_untested:
        raise _reject(
            model_type,
            f"it is not among the tested model types {list(TESTED_MODEL_TYPES)}; pass allow_untested=True to try it",
        )
    if getattr(config, "attn_logit_softcapping", None):
        raise _reject(model_type, "its attention applies logit soft-capping, which the sparse path does not implement")
    if not getattr(type(model), "_supports_sdpa", False):
        raise _reject(model_type, "it does not support SDPA attention, which DSA's dense path relies on")

    layers = find_attention_layers(model)
    if not layers:
        raise _reject(model_type, "no decoder self-attention module with a `layer_idx` was found")
    for module in layers:
        if not _uses_attention_interface(module):
            raise _reject(model_type, f"{type(module).__name__} does not dispatch through AttentionInterface")
        if getattr(module, "is_causal", True) is False:
            raise _reject(model_type, f"{type(module).__name__} is not causal")
    full_layers = [module for module in layers if not is_sliding_layer(module, config)]
    if not full_layers:
        raise _reject(
            model_type,
            "every attention layer uses a sliding window; DSA keeps sliding-window layers dense, so nothing would "
            "change (set config.sliding_window=None if the model was trained without one)",
        )
    return full_layers
