from dsa.ops.prefill.naive import sparse_prefill_reference
from dsa.ops.prefill.torch import sparse_prefill_torch

__all__ = ["sparse_prefill_reference", "sparse_prefill_torch"]
