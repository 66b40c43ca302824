from dsa.ops.indexer_loss.naive import sparse_kl_reference, warmup_kl_reference
from dsa.ops.indexer_loss.torch import sparse_kl_blockwise, warmup_kl_blockwise

__all__ = ["sparse_kl_blockwise", "sparse_kl_reference", "warmup_kl_blockwise", "warmup_kl_reference"]
