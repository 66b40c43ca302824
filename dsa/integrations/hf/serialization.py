"""Save and load DSA indexers: a small adapter (indexer weights only) or a whole converted model.

Adapter layout, written by `save_indexer`:

    indexer.safetensors   indexer weights, keys "layers.{layer_idx}.{parameter}" (e.g. "layers.3.wk.weight")
    dsa_adapter.json      {"format_version": 1, "dsa_config": {...}, "base_model": {model_type,
                           num_hidden_layers, hidden_size, converted_layers}}

A whole converted model goes through transformers' `save_pretrained` (the indexer weights sit in the
checkpoint and the DSA config in config.json as `dsa_config`) and comes back with `dsa.from_pretrained`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dsa.config import DSAConfig
from dsa._files import set_default_mode
from dsa.integrations.hf.convert import RUNTIME_FIELDS, convert, get_runtime, is_converted
from dsa.integrations.hf.support import find_attention_layers

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "indexer.safetensors"
ADAPTER_CONFIG_NAME = "dsa_adapter.json"
FORMAT_VERSION = 1


def base_signature(model: nn.Module) -> dict[str, Any]:
    """Return the fields an adapter must match: model type, layer count, hidden size, converted layers."""
    config = model.config
    signature = {
        "model_type": getattr(config, "model_type", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
    }
    if is_converted(model):
        signature["converted_layers"] = [state.layer_idx for state in get_runtime(model).layers]
    return signature


def _indexer_modules(model: nn.Module) -> dict[int, nn.Module]:
    return {module.layer_idx: module.indexer for module in find_attention_layers(model) if hasattr(module, "indexer")}


def indexer_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the indexer weights of a converted model as {"layers.{i}.{name}": tensor} on the CPU.

    Sharded weights are gathered first: DeepSpeed ZeRO-3 partitions, FSDP2 DTensors, and FSDP1 units
    (whose own state_dict gathers). Gathering is a collective call, so every rank must call this function.
    """
    get_runtime(model)
    indexers = _indexer_modules(model)
    parameters = [p for indexer in indexers.values() for p in indexer.parameters()]
    with _gathered(parameters):
        state = {}
        for layer_idx, indexer in indexers.items():
            for name, tensor in indexer.state_dict().items():
                state[f"layers.{layer_idx}.{name}"] = _full_tensor(tensor).detach().to("cpu").clone().contiguous()
    return state


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Return the whole tensor behind an FSDP2 DTensor shard (a collective), or `tensor` itself."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            return tensor.full_tensor()
    return tensor


def _gathered(parameters: list[nn.Parameter]):
    """Return a context that gathers ZeRO-3 partitioned parameters, or a no-op context otherwise."""
    if any(hasattr(p, "ds_id") for p in parameters):
        import deepspeed

        return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)
    return contextlib.nullcontext()


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename it over `path`."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        set_default_mode(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_indexer(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    tensors: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the indexer adapter of a converted model to `directory` and return the folder.

    Only `indexer.safetensors` and `dsa_adapter.json` are written, each atomically; other files in the
    folder are left alone. An existing adapter raises `FileExistsError` unless `overwrite=True`.
    `tensors` passes weights already taken with `indexer_state_dict` (distributed saving); `dtype`
    (for example torch.bfloat16) stores floating-point weights in that dtype to halve the file.
    """
    runtime = get_runtime(model)
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"cannot save the indexer adapter to {folder}: it exists and is not a folder.")
    folder.mkdir(parents=True, exist_ok=True)
    targets = [folder / WEIGHTS_NAME, folder / ADAPTER_CONFIG_NAME]
    existing = [str(path) for path in targets if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"an indexer adapter already exists at {existing}; pass overwrite=True to replace it.")

    metadata = {"format": "dsa-indexer", "format_version": str(FORMAT_VERSION)}
    if tensors is None:
        tensors = indexer_state_dict(model)
    if dtype is not None:
        tensors = {key: t.to(dtype) if t.is_floating_point() else t for key, t in tensors.items()}
    _atomic_write(targets[0], lambda path: save_file(tensors, path, metadata=metadata))
    adapter = {"format_version": FORMAT_VERSION, "dsa_config": runtime.config.to_dict(), "base_model": base_signature(model)}
    text = json.dumps(adapter, indent=2, sort_keys=True) + "\n"
    _atomic_write(targets[1], lambda path: Path(path).write_text(text, encoding="utf-8"))
    logger.info("Saved DSA indexer adapter (%d tensors) to %s", len(tensors), folder)
    return folder


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check `dsa_adapter.json`; errors name the file."""
    path = Path(directory) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"DSA adapter config not found: {path} (expected a folder written by dsa.save_indexer).")
    try:
        adapter = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"DSA adapter config {path} is not valid JSON: {error}") from error
    if not isinstance(adapter, dict) or adapter.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"DSA adapter config {path} has format_version {adapter.get('format_version') if isinstance(adapter, dict) else None!r}; expected {FORMAT_VERSION}.")
    for key in ("dsa_config", "base_model"):
        if key not in adapter:
            raise ValueError(f"DSA adapter config {path} is missing the {key!r} entry.")
    return adapter


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"DSA indexer weights not found: {path}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"DSA indexer weights {path} are corrupt or not a safetensors file: {error}") from error


def _check_signature(model: nn.Module, expected: dict[str, Any], source: Path) -> None:
    actual = base_signature(model)
    mismatches = [
        f"{key}: adapter {expected.get(key)!r}, model {actual.get(key)!r}"
        for key in ("model_type", "num_hidden_layers", "hidden_size")
        if expected.get(key) != actual.get(key)
    ]
    if mismatches:
        raise ValueError(f"the DSA adapter in {source} was trained for a different base model ({'; '.join(mismatches)}).")


def load_indexer_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy {"layers.{i}.{name}": tensor} into the model's indexers; every key must match exactly."""
    targets = {}
    for layer_idx, indexer in _indexer_modules(model).items():
        for name, tensor in indexer.state_dict().items():
            targets[f"layers.{layer_idx}.{name}"] = tensor
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise ValueError(f"DSA indexer weights in {source} do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    for key, target in targets.items():
        if tensors[key].shape != target.shape:
            raise ValueError(f"DSA indexer weight {key} in {source} has shape {tuple(tensors[key].shape)}; the model expects {tuple(target.shape)}.")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(tensors[key])


def load_indexer(model: nn.Module, directory: str | os.PathLike[str], *, mode: str = "sparse") -> nn.Module:
    """Load an adapter written by `save_indexer` into `model` and return it.

    An unconverted model is converted with the adapter's config first (in `mode`). A converted model must
    have indexers of the same shape; it takes the adapter's run-time settings (top_k, ...) too.
    """
    folder = Path(directory)
    adapter = read_adapter_config(folder)
    _check_signature(model, adapter["base_model"], folder)
    config = DSAConfig.from_dict(adapter["dsa_config"])
    tensors = _read_tensors(folder / WEIGHTS_NAME)
    if not is_converted(model):
        convert(model, config, mode=mode, indexer_trained=True)
    else:
        runtime = get_runtime(model)
        shape_fields = [f for f in config.to_dict() if f not in RUNTIME_FIELDS]
        differing = [f for f in shape_fields if getattr(runtime.config, f) != getattr(config, f)]
        if differing:
            raise ValueError(
                f"the DSA adapter in {folder} has a different indexer shape ({differing}) from the model's; "
                "load it into an unconverted model instead."
            )
        runtime.config = config
    load_indexer_weights(model, tensors, str(folder / WEIGHTS_NAME))
    get_runtime(model).indexer_trained = True
    logger.info("Loaded DSA indexer adapter from %s", folder)
    return model


def _checkpoint_indexer_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Collect the indexer tensors of a save_pretrained checkpoint as {"layers.{i}.{name}": tensor}."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights found in {folder}; save the model with save_pretrained().")
    tensors = {}
    for path in files:
        for key, tensor in _read_tensors(path).items():
            if ".indexer." not in key:
                continue
            # "model.layers.3.self_attn.indexer.wq.weight" -> "layers.3.wq.weight"
            prefix, _, name = key.partition(".indexer.")
            layer_idx = prefix.split("layers.")[-1].split(".")[0]
            tensors[f"layers.{layer_idx}.{name}"] = tensor
    return tensors


def from_pretrained(path: str | os.PathLike[str], *, mode: str = "sparse", **kwargs: Any) -> nn.Module:
    """Load a converted model saved with `model.save_pretrained(path)`; kwargs go to transformers'
    `AutoModelForCausalLM.from_pretrained` (for example `torch_dtype`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}.")
    host_config = AutoConfig.from_pretrained(folder)
    dsa_config = getattr(host_config, "dsa_config", None)
    if not isinstance(dsa_config, dict):
        raise ValueError(
            f"{folder / 'config.json'} has no 'dsa_config' entry, so it is not a converted DSA model; load it with "
            "transformers and call dsa.convert() (and dsa.load_indexer() for an adapter)."
        )
    indexer_tensors = _checkpoint_indexer_tensors(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, config=host_config, **kwargs)
    convert(model, DSAConfig.from_dict(dsa_config), mode=mode, indexer_trained=True)
    load_indexer_weights(model, indexer_tensors, str(folder))
    return model
