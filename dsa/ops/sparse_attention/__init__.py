from dsa.ops.sparse_attention.naive import indices_to_mask, sparse_attention_reference
from dsa.ops.sparse_attention.torch import sparse_attention_torch

__all__ = ["indices_to_mask", "sparse_attention_reference", "sparse_attention_torch"]
