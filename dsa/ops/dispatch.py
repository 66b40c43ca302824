"""Backend choice for the operators: one small place that maps a backend name to implementations."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from dsa.config import BACKENDS
from dsa.ops._triton import require_triton, triton_installed
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


def _triton_backend() -> Backend:
    """Return the Triton kernels for scores, selection and sparse attention, with the losses and recall in PyTorch."""
    from dsa.ops.indexer.triton import index_scores_chunk_triton, index_scores_triton
    from dsa.ops.sparse_attention.triton import sparse_attention_triton

    return Backend(
        "triton",
        index_scores_triton,
        functools.partial(select_topk_torch, scores_fn=index_scores_chunk_triton),
        sparse_attention_triton,
        warmup_kl_blockwise,
        sparse_kl_blockwise,
        attention_recall_blockwise,
        oracle_topk_blockwise,
    )


def resolve_backend(name: str, device: torch.device) -> Backend:
    """Return the implementations for backend `name` ("auto", "torch", "reference", "triton") on `device`.

    "triton" raises `RuntimeError` where the kernels cannot run (Triton missing, or CPU tensors outside
    Triton's interpreter). "auto" takes Triton on a CUDA device when it is installed, else the PyTorch
    path, and logs its choice once per device type.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is invalid; expected one of {BACKENDS}.")
    if name == "torch":
        return TORCH
    if name == "reference":
        return REFERENCE
    if name == "triton":
        require_triton(device)
        return _triton_backend()
    use_triton = device.type == "cuda" and triton_installed()
    key = (name, device.type)
    if key not in _logged_auto_choices:
        _logged_auto_choices.add(key)
        reason = "" if use_triton or device.type != "cuda" else " (triton is not installed)"
        logger.info("dsa backend 'auto' chose %r on device type %r%s.", "triton" if use_triton else "torch", device.type, reason)
    return _triton_backend() if use_triton else TORCH
