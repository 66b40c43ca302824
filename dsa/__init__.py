"""DeepSeek Sparse Attention (DSA) for the models people already use.

Layers: `dsa.ops` (operators: reference and fast path), `dsa.modules` (the lightning indexer module),
`dsa.integrations` (Hugging Face transformers).
"""

from dsa.config import PRESETS, DSAConfig
from dsa.modules import LightningIndexer

__version__ = "0.1.0"

__all__ = ["PRESETS", "DSAConfig", "LightningIndexer", "__version__"]
