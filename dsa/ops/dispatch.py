"""Backend choice for the operators: one small place that maps a backend name to implementations."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from dsa.config import BACKENDS
from dsa.ops.attention_mass import attention_recall_blockwise, attention_recall_reference, oracle_topk_blockwise, oracle_topk_reference
from dsa.ops.indexer import index_scores_reference, index_scores_torch
from dsa.ops.indexer_loss import sparse_kl_blockwise, sparse_kl_reference, warmup_kl_blockwise, warmup_kl_reference
from dsa.ops.sparse_attention import sparse_attention_reference, sparse_attention_torch
from dsa.ops.topk import select_topk_reference, select_topk_torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """The implementations of every operator for one backend."""

    name: str
    index_scores: Callable[..., torch.Tensor]
    select_topk: Callable[..., torch.Tensor]
    sparse_attention: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    warmup_kl: Callable[..., torch.Tensor]
    sparse_kl: Callable[..., torch.Tensor]
    attention_recall: Callable[..., torch.Tensor]
    oracle_topk: Callable[..., torch.Tensor]


TORCH = Backend(
    "torch",
    index_scores_torch,
    select_topk_torch,
    sparse_attention_torch,
    warmup_kl_blockwise,
    sparse_kl_blockwise,
    attention_recall_blockwise,
    oracle_topk_blockwise,
)
REFERENCE = Backend(
    "reference",
    index_scores_reference,
    select_topk_reference,
    sparse_attention_reference,
    warmup_kl_reference,
    sparse_kl_reference,
    attention_recall_reference,
    oracle_topk_reference,
)

_logged_auto_choices: set[tuple[str, str]] = set()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(name: str, device: torch.device) -> Backend:
    """Return the implementations for backend `name` ("auto", "torch", "reference", "triton") on `device`."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is invalid; expected one of {BACKENDS}.")
    if name == "torch":
        return TORCH
    if name == "reference":
        return REFERENCE
    if name == "triton":
        raise NotImplementedError(
            "backend='triton' is not available in this version of dsa: no Triton kernels are shipped yet. "
            "Use backend='torch' (or 'auto')."
        )
    # auto: the chunked PyTorch path on every device until Triton kernels exist.
    key = (name, device.type)
    if key not in _logged_auto_choices:
        _logged_auto_choices.add(key)
        logger.info("dsa backend 'auto' chose 'torch' on device type %r.", device.type)
    return TORCH
