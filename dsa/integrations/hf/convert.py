"""`convert()`: attach a lightning indexer to every full-attention layer of a loaded causal LM."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from dsa.config import DSAConfig
from dsa.integrations.hf import attention
from dsa.integrations.hf.rope import host_rope_parameters, indexer_rope_table
from dsa.integrations.hf.state import MODES, DSARuntime, LayerState
from dsa.integrations.hf.support import check_supported
from dsa.modules import LightningIndexer
from dsa.ops.dispatch import resolve_backend

logger = logging.getLogger(__name__)

# Fields that change how DSA runs but not the shape of the indexer weights.
RUNTIME_FIELDS: tuple[str, ...] = (
    "top_k", "tie_rule", "query_chunk_size", "loss_chunk_elements", "sink_tokens", "local_tokens", "backend",
    "dense_layers", "indexer_score_dtype",
)


def _check_dense_layers(config: DSAConfig, runtime: DSARuntime) -> None:
    converted = sorted(state.layer_idx for state in runtime.layers)
    unknown = sorted(set(config.dense_layers) - set(converted))
    if unknown:
        raise ValueError(
            f"dense_layers={config.dense_layers} names layers {unknown} that have no DSA indexer; "
            f"converted layers: {converted}."
        )


def default_config(model: nn.Module) -> DSAConfig:
    """Size an indexer for `model` when no config is given.

    Rule: indexer head dim DI = min(128, attention head dim), rounded down to an even number; indexer heads
    HI = hidden_size // 128, clamped to [4, 64]; rope dims R = DI / 2 (rounded down to even); the query
    is projected from the hidden state (no low-rank latent); top_k = 2048 as in DeepSeek-V3.2; RoPE theta
    and scaling from the host. For SmolLM2-135M (hidden 576, head dim 64) this gives HI 4, DI 64, R 32.
    """
    host = model.config
    head_dim = getattr(host, "head_dim", None) or host.hidden_size // host.num_attention_heads
    index_dim = min(128, head_dim) // 2 * 2
    rope_dim = index_dim // 2 // 2 * 2
    return DSAConfig(
        indexer_heads=min(64, max(4, host.hidden_size // 128)),
        indexer_head_dim=index_dim,
        rope_dim=rope_dim,
        top_k=2048,
        rope_theta=float(host_rope_parameters(host)["rope_theta"]),
        extra={"sized_from": getattr(host, "model_type", "unknown")},
    )


def is_converted(model: nn.Module) -> bool:
    return isinstance(getattr(model, "dsa_runtime", None), DSARuntime)


def get_runtime(model: nn.Module) -> DSARuntime:
    runtime = getattr(model, "dsa_runtime", None)
    if not isinstance(runtime, DSARuntime):
        raise ValueError(f"{type(model).__name__} has no DSA indexer; call dsa.convert(model) first.")
    return runtime


def convert(
    model: nn.Module,
    config: DSAConfig | None = None,
    *,
    mode: str = "sparse",
    allow_untested: bool = False,
    indexer_trained: bool = False,
) -> nn.Module:
    """Attach a lightning indexer to every full-attention layer of `model`, in place, and return it.

    Sliding-window layers keep their dense windowed attention. The mode ("dense", "warmup" or "sparse";
    see `set_mode`) starts as `mode`. Without `config` the indexer is sized by `default_config`.
    A freshly initialised indexer selects keys at random, so a warning asks to warm it up or load an
    adapter (`dsa.load_indexer`) unless `indexer_trained=True`.
    """
    if is_converted(model):
        raise ValueError("this model is already converted; use dsa.set_mode, dsa.update_config or dsa.load_indexer.")
    layers = check_supported(model, allow_untested=allow_untested)
    if config is None:
        config = default_config(model)
    elif not isinstance(config, DSAConfig):
        raise TypeError(f"config must be a DSAConfig or None, got {type(config).__name__}.")
    if config.rope_theta is None:
        config = dataclasses.replace(config, rope_theta=float(host_rope_parameters(model.config)["rope_theta"]))

    reference_parameter = next(model.parameters())
    inv_freq, attention_scaling = indexer_rope_table(model.config, config.rope_dim, config.rope_theta)
    runtime = DSARuntime(config=config, backend=resolve_backend(config.backend, reference_parameter.device))
    attention.register()
    for module in layers:
        module.indexer = LightningIndexer(model.config.hidden_size, config, inv_freq.clone(), attention_scaling).to(
            device=reference_parameter.device, dtype=reference_parameter.dtype
        )
        module.dsa_state = LayerState(runtime=runtime, layer_idx=module.layer_idx)
        runtime.layers.append(module.dsa_state)
        module.register_forward_pre_hook(attention.indexer_pre_hook, with_kwargs=True)

    _check_dense_layers(config, runtime)
    model.dsa_runtime = runtime
    model.config.dsa_config = config.to_dict()
    model.set_attn_implementation(attention.ATTENTION_NAME)
    model.register_forward_pre_hook(_clear_layer_losses, with_kwargs=True)
    model.register_forward_hook(_attach_indexer_loss, with_kwargs=True)
    set_mode(model, mode)
    runtime.indexer_trained = indexer_trained
    if not indexer_trained:
        logger.warning(
            "DSA indexers were attached to %d layers with random weights: top-k selection is arbitrary until the "
            "indexer is warmed up (mode 'warmup', or `dsa train --stage warmup`) or an adapter is loaded with "
            "dsa.load_indexer().",
            len(layers),
        )
    return model


def set_mode(model: nn.Module, mode: str) -> None:
    """Choose how converted layers attend.

    "dense" runs the original attention and leaves the indexer idle. "warmup" runs dense attention plus
    the indexer KL loss, and freezes every parameter except the indexers. "sparse" runs top-k selection
    and sparse attention, and computes the sparse-stage KL in training mode.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid; expected one of {MODES}.")
    runtime = get_runtime(model)
    runtime.mode = mode
    if mode == "warmup":
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(".indexer." in f".{name}")


def update_config(model: nn.Module, **changes: Any) -> DSAConfig:
    """Change run-time fields of a converted model's DSA config (top_k, chunk sizes, sinks, backend).

    Returns the new config. Fields that size the indexer weights raise `ValueError`.
    """
    runtime = get_runtime(model)
    fixed = sorted(set(changes) - set(RUNTIME_FIELDS))
    if fixed:
        raise ValueError(f"fields {fixed} size the indexer weights and cannot change after convert(); run-time fields: {list(RUNTIME_FIELDS)}.")
    config = dataclasses.replace(runtime.config, **changes)
    _check_dense_layers(config, runtime)
    runtime.config = config
    runtime.backend = resolve_backend(config.backend, next(model.parameters()).device)
    model.config.dsa_config = config.to_dict()
    return config


def indexer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return the parameters of all indexers of a converted model."""
    get_runtime(model)
    return [parameter for name, parameter in model.named_parameters() if ".indexer." in f".{name}"]


def keys_per_query(model: nn.Module) -> dict[int, torch.Tensor]:
    """Return, per converted layer, how many keys each query attended in the last sparse forward ([B, T])."""
    runtime = get_runtime(model)
    return {state.layer_idx: state.keys_per_query for state in runtime.layers if state.keys_per_query is not None}


def _clear_layer_losses(model: nn.Module, args: tuple, kwargs: dict) -> None:
    for state in model.dsa_runtime.layers:
        state.loss = None


_OUTPUT_TYPES: dict[type, type] = {}


def _with_indexer_fields(output_type: type) -> type:
    """Return a subclass of a transformers output dataclass with `indexer_loss` and `lm_loss` fields.

    Declared fields (not ad-hoc keys) keep the output rebuildable by code that re-creates outputs from
    their fields, such as DistributedDataParallel's output handling.
    """
    if output_type not in _OUTPUT_TYPES:
        _OUTPUT_TYPES[output_type] = dataclasses.make_dataclass(
            f"DSA{output_type.__name__}",
            [("indexer_loss", torch.Tensor | None, None), ("lm_loss", torch.Tensor | None, None)],
            bases=(output_type,),
        )
    return _OUTPUT_TYPES[output_type]


def _attach_indexer_loss(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Add `indexer_loss` (mean over layers) to the output and fold it into `loss` for Trainer.

    With labels, `loss` becomes lm_loss + indexer_loss_weight * indexer_loss and `lm_loss` keeps the
    language-modelling part; without labels, `loss` is the weighted indexer loss alone.
    """
    runtime = model.dsa_runtime
    losses = [state.loss for state in runtime.layers if state.loss is not None]
    for state in runtime.layers:
        state.loss = None
    if not losses or not isinstance(output, ModelOutput) or not dataclasses.is_dataclass(output):
        return output
    indexer_loss = torch.stack([loss.float() for loss in losses]).mean()
    fields = {field.name: getattr(output, field.name) for field in dataclasses.fields(output)}
    lm_loss = fields.get("loss")
    fields["indexer_loss"] = indexer_loss
    if lm_loss is not None:
        fields["lm_loss"] = lm_loss
        fields["loss"] = lm_loss + runtime.indexer_loss_weight * indexer_loss
    else:
        fields["loss"] = runtime.indexer_loss_weight * indexer_loss
    return _with_indexer_fields(type(output))(**fields)
