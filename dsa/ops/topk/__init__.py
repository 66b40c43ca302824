from dsa.ops.topk.naive import select_topk_reference
from dsa.ops.topk.torch import select_topk_torch

__all__ = ["select_topk_reference", "select_topk_torch"]
