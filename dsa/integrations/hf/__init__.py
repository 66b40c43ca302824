"""DSA for Hugging Face transformers causal LMs: convert, modes, save and load, the default model."""

from dsa.integrations.hf.convert import (
    convert,
    default_config,
    get_runtime,
    indexer_parameters,
    is_converted,
    keys_per_query,
    set_mode,
    update_config,
)
from dsa.integrations.hf.default_model import default_model_path, load_default_model
from dsa.integrations.hf.serialization import from_pretrained, load_indexer, save_indexer
from dsa.integrations.hf.support import TESTED_MODEL_TYPES, UnsupportedModelError

__all__ = [
    "TESTED_MODEL_TYPES",
    "UnsupportedModelError",
    "convert",
    "default_config",
    "default_model_path",
    "from_pretrained",
    "get_runtime",
    "indexer_parameters",
    "is_converted",
    "keys_per_query",
    "load_default_model",
    "load_indexer",
    "save_indexer",
    "set_mode",
    "update_config",
]
