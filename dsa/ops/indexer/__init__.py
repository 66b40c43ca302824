from dsa.ops.indexer.naive import index_scores_reference
from dsa.ops.indexer.torch import index_scores_chunk, index_scores_torch

__all__ = ["index_scores_chunk", "index_scores_reference", "index_scores_torch"]
