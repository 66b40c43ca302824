"""Runtime state that the hooks and the registered attention function share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from dsa.config import DSAConfig
from dsa.ops.dispatch import Backend

Mode = Literal["dense", "warmup", "sparse"]
MODES: tuple[str, ...] = ("dense", "warmup", "sparse")


@dataclass
class DSARuntime:
    """Settings shared by every converted layer of one model."""

    config: DSAConfig
    backend: Backend
    mode: Mode = "sparse"
    indexer_loss_weight: float = 1.0
    # True once trained weights were loaded (or training ran); silences the untrained-indexer warning.
    indexer_trained: bool = False
    # "indexer" selects keys by index score; "oracle" by true head-summed attention mass (evaluation only).
    selection: Literal["indexer", "oracle"] = "indexer"
    # When True, each converted layer stores the dense attention mass its selection covers (costs a
    # dense attention pass per layer; for logging and evaluation).
    measure_recall: bool = False
    # Query rows per sequence whose recall is measured, in RECALL_BLOCKS evenly spaced blocks; 0 measures
    # every row. Training logs sample rows (DSATrainingArguments.recall_sample_rows); evaluation keeps 0.
    recall_rows: int = 0
    layers: list["LayerState"] = field(default_factory=list)
    # The last decode mask found to hide no key: (weak reference to the mask transformers passed, its
    # version, the keys checked). Every layer of one forward receives the same mask, so one check serves all.
    visible_mask_memo: tuple[Callable[[], object], int, int] | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, object]:
        """Return the fields to pickle or deep-copy, without the decode mask memo: a weak reference cannot be
        pickled (torch.save of a whole model), and a copy never receives the original's masks."""
        state = dict(self.__dict__)
        state["visible_mask_memo"] = None
        return state


@dataclass
class LayerState:
    """Per-layer values passed from the indexer pre-hook to the attention function of one forward."""

    runtime: DSARuntime
    layer_idx: int
    # (q_idx [B, T, HI, DI], k_idx [B, S, DI], weights [B, T, HI]); consumed and cleared by the attention
    # function, so a later call can never read a stale selection input.
    indexer_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # Indexer loss of the last training-mode forward (scalar), collected by the model-level hook.
    loss: torch.Tensor | None = None
    # Number of leading positions of a static cache's preallocated buffers that contain tokens after this
    # forward. None for a dynamic cache, whose tensors contain exactly the tokens.
    filled_keys: int | None = None
    # Keys each query attended in the last forward, [B, T] int64.
    keys_per_query: torch.Tensor | None = None
    # Mean share of the dense attention mass covered by the selection, when measure_recall is on.
    recall: torch.Tensor | None = None
    extras: dict[str, object] = field(default_factory=dict)
