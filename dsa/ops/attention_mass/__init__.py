from dsa.ops.attention_mass.naive import attention_recall_reference, head_mean_attention_reference, oracle_topk_reference
from dsa.ops.attention_mass.torch import attention_recall_blockwise, oracle_topk_blockwise

__all__ = [
    "attention_recall_blockwise",
    "attention_recall_reference",
    "head_mean_attention_reference",
    "oracle_topk_blockwise",
    "oracle_topk_reference",
]
