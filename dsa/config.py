"""Configuration of DeepSeek Sparse Attention (DSA) for one model.

A `DSAConfig` sizes the lightning indexer that is attached to every attention layer and sets how the
top-k selection, the sparse attention and the indexer losses run. It is validated on construction and
round-trips through JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

RopeLayout = Literal["rotate_half", "interleaved"]
TieRule = Literal["lowest_index"]
Backend = Literal["auto", "torch", "reference", "triton"]
ScoreDtype = Literal["float32", "bfloat16"]

ROPE_LAYOUTS: tuple[str, ...] = ("rotate_half", "interleaved")
TIE_RULES: tuple[str, ...] = ("lowest_index",)
BACKENDS: tuple[str, ...] = ("auto", "torch", "reference", "triton")
SCORE_DTYPES: tuple[str, ...] = ("float32", "bfloat16")


def _require(condition: bool, name: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ValueError(f"DSAConfig.{name}={value!r} is invalid: {allowed}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DSAConfig:
    """Sizes of the lightning indexer and settings of selection, sparse attention and losses.

    Shapes use the project's alphabet: HI indexer heads, DI indexer head dim, R rope dims, K top-k slots.
    """

    indexer_heads: int = 4
    """HI: number of indexer query heads. DeepSeek-V3.2 uses 64."""

    indexer_head_dim: int = 64
    """DI: width of each indexer query head and of the single indexer key. DeepSeek-V3.2 uses 128."""

    rope_dim: int = 32
    """R: leading dims of each indexer head that get RoPE; even and at most DI. DeepSeek-V3.2 uses 64."""

    rope_layout: RopeLayout = "rotate_half"
    """Pairing of the rotated dims: "rotate_half" pairs i with i + R/2 (NeoX style, DeepSeek's layout
    since its fix of 2025-11-17); "interleaved" pairs 2i with 2i + 1."""

    top_k: int = 2048
    """K: keys each query attends to in sparse mode. DeepSeek-V3.2 uses 2048."""

    q_lora_rank: int | None = None
    """Rank of a low-rank indexer query (hidden -> rank -> RMSNorm -> HI * DI); None projects the query
    straight from the normalised hidden state."""

    tie_rule: TieRule = "lowest_index"
    """Tie rule for equal index scores at the top-k boundary: "lowest_index" keeps the earlier key."""

    query_chunk_size: int = 256
    """Queries processed together by top-k selection and sparse attention; bounds their peak memory."""

    loss_chunk_elements: int = 1 << 24
    """Upper bound on the elements of one block of the indexer losses (queries x heads x keys); 2**24
    fp32 elements are 64 MiB."""

    sink_tokens: int = 0
    """Always select the first n visible tokens of each sequence (attention sinks); 0 turns it off."""

    local_tokens: int = 0
    """Always select the last n visible tokens before each query, itself included; 0 turns it off."""

    dense_layers: list[int] = field(default_factory=list)
    """Indices of layers that keep dense attention: they run no selection and get no indexer loss, and
    their indexer weights stay unused. For layers whose attention is too diffuse for top-k (often layer 0)."""

    indexer_score_dtype: ScoreDtype = "float32"
    """Dtype of the q . k product in the index scores at inference: "float32", or "bfloat16", which rounds
    q, k and each logit to bf16 (ReLU and the weighted sum stay fp32) and keeps the indexer key cache in
    bf16, half the memory. On a CPU with AVX512-BF16 the product ran about three times faster, and about
    1 key in 500 of a top-k set changed (random and real inputs). Training losses always use fp32."""

    backend: Backend = "auto"
    """Operator implementation: "torch" (chunked PyTorch), "reference" (readable, slow), "triton"
    (GPU kernels), or "auto" (Triton on a supported GPU, else torch)."""

    rope_theta: float | None = None
    """Base of the indexer RoPE table; None takes the host model's value when converting."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata kept through JSON (for example the preset name)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the first invalid field, its value and what is allowed."""
        for name in ("indexer_heads", "indexer_head_dim", "top_k", "query_chunk_size", "loss_chunk_elements"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, value, "expected an integer >= 1")
        _require(
            _is_int(self.rope_dim) and 0 <= self.rope_dim and self.rope_dim % 2 == 0,
            "rope_dim",
            self.rope_dim,
            "expected an even integer >= 0",
        )
        _require(
            self.rope_dim <= self.indexer_head_dim,
            "rope_dim",
            self.rope_dim,
            f"expected at most indexer_head_dim={self.indexer_head_dim}",
        )
        _require(self.rope_layout in ROPE_LAYOUTS, "rope_layout", self.rope_layout, f"expected one of {ROPE_LAYOUTS}")
        _require(
            self.q_lora_rank is None or (_is_int(self.q_lora_rank) and self.q_lora_rank >= 1),
            "q_lora_rank",
            self.q_lora_rank,
            "expected None (project from the hidden state) or an integer >= 1",
        )
        _require(self.tie_rule in TIE_RULES, "tie_rule", self.tie_rule, f"expected one of {TIE_RULES}")
        for name in ("sink_tokens", "local_tokens"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 0, name, value, "expected an integer >= 0")
        _require(
            self.sink_tokens + self.local_tokens <= self.top_k,
            "sink_tokens",
            self.sink_tokens,
            f"sink_tokens + local_tokens must not exceed top_k={self.top_k}",
        )
        _require(
            isinstance(self.dense_layers, (list, tuple))
            and all(_is_int(layer) and layer >= 0 for layer in self.dense_layers)
            and len(set(self.dense_layers)) == len(self.dense_layers),
            "dense_layers",
            self.dense_layers,
            "expected a list of distinct layer indices >= 0",
        )
        self.dense_layers = sorted(self.dense_layers)
        _require(
            self.indexer_score_dtype in SCORE_DTYPES, "indexer_score_dtype", self.indexer_score_dtype, f"expected one of {SCORE_DTYPES}"
        )
        _require(self.backend in BACKENDS, "backend", self.backend, f"expected one of {BACKENDS}")
        _require(
            self.rope_theta is None or (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0),
            "rope_theta",
            self.rope_theta,
            "expected None or a positive number",
        )
        _require(isinstance(self.extra, dict), "extra", self.extra, "expected a dict")

    # ---- JSON round trip ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DSAConfig:
        """Build a config from a dict; unknown keys raise so a typo never passes silently."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"DSAConfig got unknown fields {unknown}; known fields are {sorted(known)}.")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> DSAConfig:
        return cls.from_dict(json.loads(text))

    def to_json_file(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> DSAConfig:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError as error:
            raise FileNotFoundError(f"DSA config file not found: {os.fspath(path)}") from error
        try:
            return cls.from_json_string(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"DSA config file {os.fspath(path)} is not valid JSON: {error}") from error

    # ---- presets ------------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DSAConfig:
        """Return a named preset, with keyword overrides applied; see `PRESETS` for the names."""
        if name not in PRESETS:
            raise ValueError(f"Unknown DSA preset {name!r}; available presets: {sorted(PRESETS)}.")
        values = dict(PRESETS[name])
        values.update(overrides)
        values.setdefault("extra", {})
        values["extra"] = {**values["extra"], "preset": name}
        return cls(**values)


PRESETS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M: hidden 576, 9 query heads, 3 KV heads, head dim 64, 30 layers, 8192 positions.
    # Four 32-dim indexer heads (the shipped adapter's shape) add about 95k parameters per layer, 2.8M
    # over 30 layers (2% of the model, 5.7 MB in bf16), and a 32-dim indexer key per cached token.
    "smollm2-135m": {
        "indexer_heads": 4,
        "indexer_head_dim": 32,
        "rope_dim": 16,
        "top_k": 256,
    },
    # DeepSeek-V3.2-Exp (config_671B_v3.2.json): index_n_heads 64, index_head_dim 128, rope 64,
    # index_topk 2048, indexer query from the 1536-wide query latent.
    "deepseek-v3.2": {
        "indexer_heads": 64,
        "indexer_head_dim": 128,
        "rope_dim": 64,
        "top_k": 2048,
        "q_lora_rank": 1536,
        "rope_theta": 10000.0,
    },
}
