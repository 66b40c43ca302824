"""DeepSeek Sparse Attention (DSA) for the models people already use.

Layers: `dsa.ops` (operators: reference and fast path), `dsa.modules` (the lightning indexer module),
`dsa.integrations` (Hugging Face transformers: `convert`, `save_indexer`, `load_indexer`, ...).
"""

from dsa.config import PRESETS, DSAConfig
from dsa.integrations.hf import (
    TESTED_MODEL_TYPES,
    UnsupportedModelError,
    convert,
    default_config,
    default_model_path,
    from_pretrained,
    get_runtime,
    indexer_parameters,
    is_converted,
    keys_per_query,
    load_default_model,
    load_indexer,
    save_indexer,
    set_mode,
    update_config,
)
from dsa.modules import LightningIndexer

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "TESTED_MODEL_TYPES",
    "DSAConfig",
    "LightningIndexer",
    "UnsupportedModelError",
    "__version__",
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
