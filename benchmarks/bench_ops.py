"""Time DSA's operators against dense attention at SmolLM2-135M or Qwen3-4B layer shapes, fp32 on the CPU.

The DSA path is `select_topk_torch` (lightning indexer scores and top-k selection, fused per chunk of
queries) followed by `sparse_attention_torch`; a prefill runs both per block of queries through
`sparse_prefill_torch`, as converted models do without gradients. The dense path is PyTorch's
`scaled_dot_product_attention` with causal masking and grouped-query attention. Both paths get random
inputs, or with `--inputs real` the attention and indexer inputs of one layer of SmolLM2-135M-Instruct
with the shipped indexer adapter, on real text. The indexer projections (hidden state -> q_idx, k_idx,
weights) are not part of this operator-level benchmark.

Every (path, size) case runs in a fresh child process, which runs one warm-up call, checks that call's
output against the reference operators, then times `--repeats` calls and reports their times. A second
fresh child, with glibc's mmap threshold fixed, measures the growth of its resident set during one call. Correctness is checked before anything is timed: a failed check stops the
run with exit status 1.

    python benchmarks/bench_ops.py            # full sweep, about 12 minutes on an idle 2-core CPU
    python benchmarks/bench_ops.py --quick    # short sweep, about a minute
    python benchmarks/bench_ops.py --help

docs/benchmarks.md describes what is measured and records a run.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

# Benchmark the checkout this script belongs to, even when another `dsa` is installed.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import dsa  # noqa: E402
from dsa.ops.indexer import index_scores_reference  # noqa: E402
from dsa.ops.prefill import sparse_prefill_torch  # noqa: E402
import dsa.ops.prefill.torch as prefill_torch  # noqa: E402
from dsa.ops.sparse_attention import sparse_attention_reference, sparse_attention_torch  # noqa: E402
from dsa.ops.topk import select_topk_reference, select_topk_torch  # noqa: E402

# ---- the sweep, declared once ------------------------------------------------------------------------

# Prefill: T queries attend causally to the same T keys. Decode: one query at position S - 1 attends
# to a cache of S keys.
PREFILL_TOKENS: tuple[int, ...] = (4096, 8192, 16384, 32768)
DECODE_CACHE_TOKENS: tuple[int, ...] = (8192, 16384, 32768, 65536, 131072)
QUICK_PREFILL_TOKENS: tuple[int, ...] = (1024, 2048)
QUICK_DECODE_CACHE_TOKENS: tuple[int, ...] = (8192, 16384)
# --inputs real reads one text, whose length bounds the sizes: the held-out Poe has 82,283 tokens.
REAL_PREFILL_TOKENS: tuple[int, ...] = (4096, 8192, 16384, 32768)
REAL_DECODE_CACHE_TOKENS: tuple[int, ...] = (8192, 16384, 32768, 65536)
TIERS: tuple[str, ...] = ("prefill", "decode")
PATHS: tuple[str, ...] = ("dense", "dsa")
INPUTS: tuple[str, ...] = ("random", "real")
SCORE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# --inputs real: the default model with the shipped adapter reads this text; the layer must be sparse.
DEFAULT_TEXT = REPO_ROOT.parent / "shared" / "data" / "poe.txt"
DEFAULT_ADAPTER = REPO_ROOT / "adapters" / "smollm2-135m"
DEFAULT_REAL_LAYER = 1

BATCH = 1


@dataclass(frozen=True)
class LayerShape:
    """One attention layer: H query heads, HKV key/value heads of dim D, and an indexer of HI heads of DI dims."""

    heads: int
    kv_heads: int
    head_dim: int
    indexer_heads: int
    indexer_head_dim: int
    indexer_source: str


def _preset_shape(heads: int, kv_heads: int, head_dim: int, preset: str) -> LayerShape:
    config = dsa.DSAConfig.preset(preset)
    return LayerShape(heads, kv_heads, head_dim, config.indexer_heads, config.indexer_head_dim, f"preset {preset}")


# SmolLM2-135M: the indexer of the DSA preset of the same name. Qwen3-4B (hidden 2560, 32 heads of 128,
# 8 kv heads): the indexer `dsa.convert` sizes by default (HI = hidden / 128, DI = min(128, D)).
SHAPES: dict[str, LayerShape] = {
    "smollm2-135m": _preset_shape(9, 3, 64, "smollm2-135m"),
    "qwen3-4b": LayerShape(32, 8, 128, 20, 128, "dsa.convert default for hidden 2560"),
}
DTYPE = torch.float32

# Small shape of the pre-run checks against the slow references (select_topk_reference loops in Python).
SMALL_CHECK_TOKENS = 300
SMALL_CHECK_TOP_K = 64
# Prefill rows beyond top_k whose selection and output are compared with the references in each case.
SAMPLE_ROWS = 4
ATOL = 1e-5
RTOL = 1e-5
# Index scores of the fast path and the reference differ by fp32 rounding, so two keys whose scores
# differ by less than this (relative to the boundary score) may swap places at the top-k boundary.
SCORE_TIE_TOLERANCE = 1e-5
# With a bf16 score product, one logit may round to the neighbouring bf16 value (2**-8 of it) when
# the two sides sum its fp32 terms in another order.
BF16_SCORE_TIE_TOLERANCE = 2**-7

# glibc grows its mmap threshold when large blocks are freed, after which freed buffers stay resident
# and inflate the resident-set peak. A fixed threshold returns every block of 64 KiB or more on free.
# The operator benchmark sets it (strict_allocator) only for its untimed memory call: every large
# allocation then costs an mmap and page faults, which slowed a SmolLM2 decode step from 1.25 to 2.9 ms.
# The training benchmark, which reports memory, starts its children with it.
MMAP_THRESHOLD = 65536
CHILD_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
CHECK_FAILED_EXIT = 3
MIB = 2**20
# Cases during which other processes kept more CPU cores than this busy are retried (--retries) and
# then flagged: on a shared machine each of torch's parallel regions waits for a descheduled worker.
CONTENTION_WARNING_CORES = 0.1
IDLE_SAMPLE_S = 2.0


class CheckFailed(Exception):
    """A fast path disagrees with its reference; the message names the path, the shape and the difference."""


@dataclass(frozen=True)
class CaseSpec:
    """One timed case: a path ("dense" or "dsa") in a tier ("prefill" or "decode") at one size."""

    tier: str
    tokens: int
    path: str
    top_k: int
    chunk_size: int
    repeats: int
    seed: int
    shape: str = "smollm2-135m"
    score_dtype: str = "float32"
    inputs: str = "random"
    # --inputs real: the file of captured layer inputs for `tokens` tokens (see capture_real_inputs).
    real_file: str | None = None

    @property
    def queries(self) -> int:
        return self.tokens if self.tier == "prefill" else 1


@dataclass
class CaseInputs:
    """Random layer inputs: q [B, T, H, D], k and v [B, HKV, S, D] (the Hugging Face cache layout),
    q_idx [B, T, HI, DI], k_idx [B, S, DI] and weights [B, T, HI]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_idx: torch.Tensor
    k_idx: torch.Tensor
    weights: torch.Tensor

    @property
    def q_start(self) -> int:
        return self.k.shape[2] - self.q.shape[1]


# ---- machine and versions ----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def total_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect_machine_info() -> dict[str, Any]:
    """Describe the CPU, the OS and the software versions the numbers were measured with."""
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": total_memory_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "numpy": package_version("numpy"),
        "dsa": dsa.__version__,
        "dsa_path": str(Path(dsa.__file__).parent),
        "dtype": str(DTYPE).removeprefix("torch."),
    }


def format_machine_info(machine: dict[str, Any]) -> str:
    memory = machine["memory_bytes"]
    memory_text = f"{memory / 2**30:.1f} GiB" if memory else "unknown"
    return "\n".join(
        [
            f"machine       {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs "
            f"({machine['usable_cpus']} usable), {memory_text} RAM, torch threads {machine['torch_threads']}",
            f"platform      {machine['platform']}",
            f"versions      Python {machine['python']}, torch {machine['torch']}, "
            f"transformers {machine['transformers']}, numpy {machine['numpy']}, dsa {machine['dsa']}",
            f"dtype         {machine['dtype']}",
        ]
    )


# ---- inputs and the two timed paths ------------------------------------------------------------------


def make_inputs(shape: LayerShape, queries: int, keys: int, generator: torch.Generator) -> CaseInputs:

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=DTYPE)

    return CaseInputs(
        q=randn(BATCH, queries, shape.heads, shape.head_dim),
        k=randn(BATCH, shape.kv_heads, keys, shape.head_dim),
        v=randn(BATCH, shape.kv_heads, keys, shape.head_dim),
        q_idx=randn(BATCH, queries, shape.indexer_heads, shape.indexer_head_dim),
        k_idx=randn(BATCH, keys, shape.indexer_head_dim),
        weights=randn(BATCH, queries, shape.indexer_heads),
    )


def dense_attention(inputs: CaseInputs) -> torch.Tensor:
    """Return SDPA's output [B, T, H, D]. A single query (decode) attends to every key, a block of
    queries attends causally (T = S here)."""
    causal = inputs.q.shape[1] > 1
    out = F.scaled_dot_product_attention(
        inputs.q.transpose(1, 2), inputs.k, inputs.v, is_causal=causal, enable_gqa=True
    )
    return out.transpose(1, 2)


def load_real_inputs(path: str, queries: int) -> CaseInputs:
    """Return the layer inputs captured in `path` (see capture_real_inputs), keeping the last `queries`
    query rows: all of them for a prefill, the last token for a decode step."""
    saved = torch.load(path)
    rows = slice(saved["q"].shape[1] - queries, None)
    return CaseInputs(
        q=saved["q"][:, rows].contiguous(), k=saved["k"], v=saved["v"], q_idx=saved["q_idx"][:, rows].contiguous(),
        k_idx=saved["k_idx"], weights=saved["weights"][:, rows].contiguous(),
    )


def case_inputs(spec: CaseSpec) -> CaseInputs:
    """Return a case's inputs. With a bf16 score product, k_idx is stored in bf16, as a converted model's
    indexer key cache stores it (`DSAConfig.indexer_score_dtype`)."""
    if spec.inputs == "real":
        assert spec.real_file is not None
        inputs = load_real_inputs(spec.real_file, spec.queries)
    else:
        inputs = make_inputs(SHAPES[spec.shape], spec.queries, spec.tokens, torch.Generator().manual_seed(spec.seed))
    inputs.k_idx = inputs.k_idx.to(SCORE_DTYPES[spec.score_dtype])
    return inputs


def dsa_select(inputs: CaseInputs, top_k: int, chunk_size: int, score_dtype: str = "float32") -> torch.Tensor:
    return select_topk_torch(
        inputs.q_idx, inputs.k_idx, inputs.weights, top_k, q_start=inputs.q_start, chunk_size=chunk_size,
        score_dtype=SCORE_DTYPES[score_dtype],
    )


def dsa_prefill(inputs: CaseInputs, top_k: int, chunk_size: int, score_dtype: str = "float32") -> torch.Tensor:
    out, _ = sparse_prefill_torch(
        inputs.q, inputs.k.transpose(1, 2), inputs.v.transpose(1, 2), inputs.q_idx, inputs.k_idx, inputs.weights, top_k,
        q_start=inputs.q_start, chunk_size=chunk_size, score_dtype=SCORE_DTYPES[score_dtype],
    )
    return out


def dsa_attend(inputs: CaseInputs, indices: torch.Tensor, chunk_size: int) -> torch.Tensor:
    # Transposed views of the [B, HKV, S, D] tensors, as the model integration passes its cache.
    return sparse_attention_torch(
        inputs.q, inputs.k.transpose(1, 2), inputs.v.transpose(1, 2), indices, chunk_size=chunk_size
    )


def capture_real_inputs(
    token_counts: list[int], text: Path, layer: int, directory: Path, adapter: Path = DEFAULT_ADAPTER
) -> dict[int, Path]:
    """Run the default model with the shipped adapter over the first T tokens of `text`, for each T in
    token_counts, and save layer `layer`'s attention inputs (q, k, v after RoPE) and indexer inputs
    (q_idx, k_idx, weights) to `directory`. Returns the file of each T.

    The model runs dense attention with the indexers on (warm-up mode, no gradients) and stops at that
    layer, so the earlier layers cost one dense forward each.
    """
    from transformers import AttentionInterface

    from dsa.evaluation.main import load_converted_model
    from dsa.integrations.hf import attention as hf_attention

    model, tokenizer = load_converted_model("default", str(adapter))
    layers = model.config.num_hidden_layers
    dense_layers = dsa.get_runtime(model).config.dense_layers
    if not 0 <= layer < layers:
        raise SystemExit(f"error: --real-layer {layer} is out of range; the model has layers 0-{layers - 1}.")
    if layer in dense_layers:
        raise SystemExit(
            f"error: --real-layer {layer} is a dense layer of the adapter; choose one of 0-{layers - 1} outside "
            f"its dense layers {dense_layers}."
        )
    token_ids = tokenizer(text.read_text(encoding="utf-8"))["input_ids"]
    if max(token_counts) > len(token_ids):
        raise SystemExit(
            f"error: {text} has {len(token_ids)} tokens, fewer than the {max(token_counts)} of the requested sizes "
            "(--prefill-tokens, --decode-tokens, or the sweep's defaults); choose smaller sizes or a longer --text."
        )
    dsa.set_mode(model, "warmup")
    captured: dict[str, torch.Tensor] = {}

    class LayerCaptured(Exception):
        pass

    def capture(module, query, key, value, attention_mask, *args, **kwargs):
        state = module.dsa_state
        if state.layer_idx != layer:
            return hf_attention.dsa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
        q_idx, k_idx, weights = state.indexer_inputs
        captured.update(
            q=query.transpose(1, 2).contiguous(), k=key.contiguous(), v=value.contiguous(),
            q_idx=q_idx.contiguous(), k_idx=k_idx.contiguous(), weights=weights.contiguous(),
        )
        raise LayerCaptured

    files: dict[int, Path] = {}
    AttentionInterface.register(hf_attention.ATTENTION_NAME, capture)
    try:
        for tokens in tqdm(sorted(set(token_counts)), desc=f"capturing layer {layer} inputs", unit="length", file=sys.stderr):
            ids = torch.tensor([token_ids[:tokens]])
            try:
                with torch.inference_mode():
                    model(ids, use_cache=False)
            except LayerCaptured:
                pass
            files[tokens] = directory / f"layer{layer}-{tokens}.pt"
            torch.save({name: tensor.float() for name, tensor in captured.items()}, files[tokens])
            captured.clear()
    finally:
        hf_attention.register()
    return files


# ---- correctness checks ------------------------------------------------------------------------------


def assert_close(label: str, actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> float:
    """Return the max abs difference of actual and expected, or raise CheckFailed unless they are
    allclose within atol and RTOL."""
    if actual.shape != expected.shape:
        raise CheckFailed(f"{label}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}.")
    difference = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    if not torch.allclose(actual, expected, atol=atol, rtol=RTOL):
        raise CheckFailed(f"{label}: max abs difference {difference:.3g} exceeds atol={atol:.3g}, rtol={RTOL}.")
    return difference


def output_atol(inputs: CaseInputs) -> float:
    """Return the absolute tolerance of one case's attention outputs: ATOL for values up to 1 and 4096
    keys, scaled by max |v| and by the square root of the keys, because fp32 rounding errors of a sum
    over S weighted values grow that way. Real inputs need it: at 64k keys SDPA and the oracle differ
    by 3.8e-5 with max |v| = 3.2."""
    keys = inputs.k.shape[2]
    return ATOL * max(1.0, float(inputs.v.abs().max())) * max(1.0, math.sqrt(keys / 4096))


def causal_index_rows(positions: list[int], width: int) -> torch.Tensor:
    """Return indices [1, len(positions), width] listing keys 0..p for each query position p, -1 after."""
    keys = torch.arange(width)
    rows = [torch.where(keys <= position, keys, -1) for position in positions]
    return torch.stack(rows).unsqueeze(0)


def check_selected_row(
    inputs: CaseInputs, row: int, top_k: int, selected: torch.Tensor, score_dtype: str = "float32"
) -> int:
    """Compare one row of select_topk_torch's output with select_topk_reference.

    Keys may differ only where their reference scores tie the boundary score within
    SCORE_TIE_TOLERANCE (BF16_SCORE_TIE_TOLERANCE with a bf16 score product). Returns how many keys
    were swapped that way.
    """
    position = inputs.q_start + row
    q_row, w_row = inputs.q_idx[:, row : row + 1], inputs.weights[:, row : row + 1]
    dtype = SCORE_DTYPES[score_dtype]
    tolerance = SCORE_TIE_TOLERANCE if dtype == torch.float32 else BF16_SCORE_TIE_TOLERANCE
    expected = select_topk_reference(q_row, inputs.k_idx, w_row, top_k, q_start=position, score_dtype=dtype)[0, 0]
    if torch.equal(expected, selected):
        return 0

    where = f"selection row {row} (query position {position}, S={inputs.k_idx.shape[1]}, top_k={top_k})"
    chosen = selected[selected >= 0]
    if selected.shape != expected.shape or not torch.equal(chosen, chosen.sort().values):
        raise CheckFailed(f"{where}: indices are not ascending or have shape {tuple(selected.shape)}.")
    expected_set, chosen_set = set(expected[expected >= 0].tolist()), set(chosen.tolist())
    if len(chosen_set) != len(expected_set) or max(chosen_set) > position:
        raise CheckFailed(
            f"{where}: {len(chosen_set)} keys chosen up to key {max(chosen_set)}; expected "
            f"{len(expected_set)} keys up to key {position}."
        )
    scores = index_scores_reference(q_row, inputs.k_idx, w_row, score_dtype=dtype)[0, 0]
    boundary = scores[sorted(expected_set)].min().item()
    swapped = sorted(expected_set ^ chosen_set)
    gap = (scores[swapped] - boundary).abs().max().item()
    if gap > tolerance * max(1.0, abs(boundary)):
        raise CheckFailed(
            f"{where}: {len(swapped) // 2} of {len(expected_set)} keys differ from the reference, with scores up to "
            f"{gap:.3g} from the boundary score {boundary:.6g}, more than a rounding tie."
        )
    return len(swapped) // 2


def sample_rows(spec: CaseSpec) -> list[int]:
    """Pick the query rows that each case compares with the references."""
    if spec.queries == 1:
        return [0]
    # DSA rows below top_k see at most top_k keys; check_dsa_case covers them all at once.
    first = min(spec.top_k, spec.queries - 1) if spec.path == "dsa" else 0
    rows = {first, (first + spec.queries) // 2, spec.queries - 1}
    generator = torch.Generator().manual_seed(spec.seed)
    while len(rows) < min(SAMPLE_ROWS, spec.queries - first):
        rows.add(int(torch.randint(first, spec.queries, (1,), generator=generator)))
    return sorted(rows)


def check_dense_case(spec: CaseSpec, inputs: CaseInputs, out: torch.Tensor) -> dict[str, Any]:
    """Compare sampled rows of SDPA's output with the dense-mask oracle over each row's causal keys."""
    rows = sample_rows(spec)
    positions = [inputs.q_start + row for row in rows]
    indices = causal_index_rows(positions, inputs.k.shape[2])
    expected = sparse_attention_reference(
        inputs.q[:, rows], inputs.k.transpose(1, 2), inputs.v.transpose(1, 2), indices
    )
    difference = assert_close(f"dense {spec.tier} {spec.tokens}: rows {rows} vs the oracle", out[:, rows], expected, output_atol(inputs))
    return {"rows": rows, "max_abs_difference": difference}


def check_dsa_case(
    spec: CaseSpec, inputs: CaseInputs, indices: torch.Tensor, out: torch.Tensor
) -> dict[str, Any]:
    """Check the DSA output of one case without any [T, S] work.

    Rows that see at most top_k keys must select all of them, so their output equals SDPA's on the
    same prefix. Sampled rows that see more keys are compared with select_topk_reference and with the
    dense-mask oracle computed for those rows only.
    """
    name = f"dsa {spec.tier} {spec.tokens}"
    result: dict[str, Any] = {}
    keys = inputs.k.shape[2]
    prefix = min(spec.queries, max(spec.top_k - inputs.q_start, 0))
    if prefix:
        head = CaseInputs(
            inputs.q[:, :prefix], inputs.k[:, :, : inputs.q_start + prefix], inputs.v[:, :, : inputs.q_start + prefix],
            inputs.q_idx[:, :prefix], inputs.k_idx[:, : inputs.q_start + prefix], inputs.weights[:, :prefix],
        )
        result["prefix_rows"] = prefix
        result["prefix_max_abs_difference"] = assert_close(
            f"{name}: first {prefix} rows vs SDPA", out[:, :prefix], dense_attention(head), output_atol(head)
        )
    if keys <= spec.top_k:
        return result

    rows = [row for row in sample_rows(spec) if row >= prefix]
    result["rows"] = rows
    result["tie_swaps"] = sum(check_selected_row(inputs, row, spec.top_k, indices[0, row], spec.score_dtype) for row in rows)
    expected = sparse_attention_reference(
        inputs.q[:, rows], inputs.k.transpose(1, 2), inputs.v.transpose(1, 2), indices[:, rows]
    )
    result["max_abs_difference"] = assert_close(f"{name}: rows {rows} vs the oracle", out[:, rows], expected, output_atol(inputs))
    return result


def check_small_shapes(shape: LayerShape, top_k: int, chunk_size: int, seed: int, score_dtype: str = "float32") -> list[dict[str, Any]]:
    """Compare both paths with the references on small prefill and decode shapes, or raise CheckFailed."""
    top_k = min(top_k, SMALL_CHECK_TOP_K)
    generator = torch.Generator().manual_seed(seed)
    results = []
    for tier, queries in (("prefill", SMALL_CHECK_TOKENS), ("decode", 1)):
        inputs = make_inputs(shape, queries, SMALL_CHECK_TOKENS, generator)
        k_view, v_view = inputs.k.transpose(1, 2), inputs.v.transpose(1, 2)
        name = f"{tier} T={queries} S={SMALL_CHECK_TOKENS} top_k={top_k}"

        positions = list(range(inputs.q_start, inputs.q_start + queries))
        oracle = sparse_attention_reference(inputs.q, k_view, v_view, causal_index_rows(positions, SMALL_CHECK_TOKENS))
        dense_difference = assert_close(f"dense {name} vs the oracle", dense_attention(inputs), oracle)

        indices = dsa_select(inputs, top_k, chunk_size, score_dtype)
        expected_indices = select_topk_reference(
            inputs.q_idx, inputs.k_idx, inputs.weights, top_k, q_start=inputs.q_start, score_dtype=SCORE_DTYPES[score_dtype]
        )
        if not torch.equal(indices, expected_indices):
            mismatched = (indices != expected_indices).any(dim=-1).sum().item()
            raise CheckFailed(f"dsa {name}: select_topk_torch differs from select_topk_reference in {mismatched} rows.")
        expected = sparse_attention_reference(inputs.q, k_view, v_view, indices)
        dsa_difference = assert_close(f"dsa {name}: sparse_attention_torch vs the oracle", dsa_attend(inputs, indices, chunk_size), expected)
        results.append(
            {"tier": tier, "queries": queries, "keys": SMALL_CHECK_TOKENS, "top_k": top_k,
             "dense_max_abs_difference": dense_difference, "dsa_max_abs_difference": dsa_difference}
        )
    return results


# ---- one case, in a child process --------------------------------------------------------------------


def current_rss_bytes() -> int:
    with open("/proc/self/statm", encoding="utf-8") as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Return the process's resident-set high-water mark (VmHWM in /proc/self/status).

    Not ru_maxrss: after fork and exec, ru_maxrss starts at the parent's RSS and clear_refs does not
    lower it (measured: the child of a 730 MiB parent reported 730 MiB while its VmHWM was 11 MiB).
    """
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM is missing from /proc/self/status; peak memory cannot be measured.")


def strict_allocator() -> None:
    """Make glibc return freed blocks of MMAP_THRESHOLD bytes or more at once, and trim its heap."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_mmap_threshold = -3  # mallopt's parameter number, from glibc's malloc.h
    if libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD) != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed; peak memory cannot be isolated.")
    libc.malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS, or return False where the kernel does not allow it.

    Writing 5 to /proc/self/clear_refs (Linux 4.0 and later) does this.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def run_case(spec: CaseSpec) -> dict[str, Any]:
    """Warm up, check, then time one case; return its times and resident-set growth."""
    inputs = case_inputs(spec)
    fused = spec.path == "dsa" and spec.queries > 1
    dtype = spec.score_dtype

    # Warm-up call, whose output is checked before any call is timed.
    if spec.path == "dense":
        out = dense_attention(inputs)
        check = check_dense_case(spec, inputs, out)
    else:
        indices = dsa_select(inputs, spec.top_k, spec.chunk_size, dtype)
        out = dsa_attend(inputs, indices, spec.chunk_size)
        check = check_dsa_case(spec, inputs, indices, out)
        del indices
        if fused:
            check["fused_max_abs_difference"] = assert_close(
                f"dsa {spec.tier} {spec.tokens}: sparse_prefill_torch vs the two operators",
                dsa_prefill(inputs, spec.top_k, spec.chunk_size, dtype), out, output_atol(inputs),
            )
    del out
    gc.collect()

    # Timed calls run with glibc's default allocator settings, as a user's program would.
    times_ms, select_ms, attention_ms = [], [], []
    for _ in range(spec.repeats):
        if spec.path == "dense":
            start = time.perf_counter()
            out = dense_attention(inputs)
            times_ms.append((time.perf_counter() - start) * 1e3)
        elif fused:
            start = time.perf_counter()
            out = dsa_prefill(inputs, spec.top_k, spec.chunk_size, dtype)
            times_ms.append((time.perf_counter() - start) * 1e3)
        else:
            start = time.perf_counter()
            indices = dsa_select(inputs, spec.top_k, spec.chunk_size, dtype)
            selected = time.perf_counter()
            out = dsa_attend(inputs, indices, spec.chunk_size)
            stop = time.perf_counter()
            select_ms.append((selected - start) * 1e3)
            attention_ms.append((stop - selected) * 1e3)
            times_ms.append((stop - start) * 1e3)
            del indices
        del out
    if fused:
        # To split a fused prefill's time, one more call runs with its per-block selections timed
        # (a wrapper around the prefill's select_topk_torch), so that they keep the prefill's chunks
        # and memory. The attention share is the rest of that call.
        select_s = [0.0]
        original_select = prefill_torch.select_topk_torch

        def timed_select(*args: Any, **kwargs: Any) -> torch.Tensor:
            begin = time.perf_counter()
            try:
                return original_select(*args, **kwargs)
            finally:
                select_s[0] += time.perf_counter() - begin

        prefill_torch.select_topk_torch = timed_select
        try:
            start = time.perf_counter()
            out = dsa_prefill(inputs, spec.top_k, spec.chunk_size, dtype)
            total_ms = (time.perf_counter() - start) * 1e3
        finally:
            prefill_torch.select_topk_torch = original_select
        del out
        select_ms = [select_s[0] * 1e3]
        attention_ms = [total_ms - select_ms[0]]

    result: dict[str, Any] = {
        "times_ms": times_ms,
        "median_ms": statistics.median(times_ms),
        "torch_threads": torch.get_num_threads(),
        "check": check,
    }
    if spec.path == "dsa":
        result.update(
            select_ms=select_ms,
            attention_ms=attention_ms,
            median_select_ms=statistics.median(select_ms),
            median_attention_ms=statistics.median(attention_ms),
        )
    return result


def path_call(spec: CaseSpec, inputs: CaseInputs) -> Any:
    """Return a function of no arguments that runs the case's path once and returns its output."""
    if spec.path == "dense":
        return lambda: dense_attention(inputs)
    if spec.queries > 1:
        return lambda: dsa_prefill(inputs, spec.top_k, spec.chunk_size, spec.score_dtype)
    return lambda: dsa_attend(inputs, dsa_select(inputs, spec.top_k, spec.chunk_size, spec.score_dtype), spec.chunk_size)


def measure_memory(spec: CaseSpec) -> dict[str, Any]:
    """Run the case's path once to warm up, then once more and return that call's resident-set growth.

    The child runs with glibc's mmap threshold fixed at MMAP_THRESHOLD from its start (CHILD_ENVIRONMENT),
    so that freed blocks of 64 KiB or more go back to the kernel at once and no earlier call's heap
    shapes this one's peak. The high-water mark is reset just before the call; where the reset fails,
    the growth is None.
    """
    inputs = case_inputs(spec)
    call = path_call(spec, inputs)
    out = call()
    del out
    gc.collect()
    strict_allocator()
    peak_is_isolated = reset_peak_rss()
    baseline = current_rss_bytes()
    out = call()
    del out
    peak = peak_rss_bytes()
    return {
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_rss_growth_bytes": peak - baseline if peak_is_isolated else None,
    }


def memory_case_main(encoded: str) -> int:
    """Entry point of the memory child process: print measure_memory's result for the case as JSON."""
    with torch.inference_mode():
        result = measure_memory(CaseSpec(**json.loads(encoded)))
    print(json.dumps(result))
    return 0


def case_main(encoded: str) -> int:
    """Entry point of the child process: run the case given as JSON and print its result as JSON."""
    spec = CaseSpec(**json.loads(encoded))
    try:
        with torch.inference_mode():
            result = run_case(spec)
    except CheckFailed as error:
        print(f"correctness check failed, so this path is not timed: {error}", file=sys.stderr)
        return CHECK_FAILED_EXIT
    print(json.dumps(result))
    return 0


def read_cpu_seconds() -> tuple[float, float]:
    """Return (busy, steal) CPU seconds of the whole machine since boot, summed over its CPUs."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(value) for value in handle.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / ticks_per_second, steal / ticks_per_second


def own_cpu_seconds() -> float:
    """Return the CPU seconds used by this process and its finished children."""
    total = 0.0
    for target in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(target)
        total += usage.ru_utime + usage.ru_stime
    return total


def other_cpu_cores(interval_s: float) -> float:
    """Return the CPU cores that other processes kept busy, averaged over the next interval_s seconds."""
    busy_before, _ = read_cpu_seconds()
    own_before = own_cpu_seconds()
    time.sleep(interval_s)
    busy_after, _ = read_cpu_seconds()
    return max((busy_after - busy_before) - (own_cpu_seconds() - own_before), 0.0) / interval_s


def wait_for_idle(max_wait_s: float) -> float:
    """Wait until other processes use at most CONTENTION_WARNING_CORES or max_wait_s has passed; return
    the seconds waited."""
    started = time.perf_counter()
    announced = False
    while time.perf_counter() - started < max_wait_s:
        busy = other_cpu_cores(IDLE_SAMPLE_S)
        if busy <= CONTENTION_WARNING_CORES:
            break
        if not announced:
            tqdm.write(
                f"waiting up to {max_wait_s:.0f} s for other processes to go idle (they use {busy:.2f} cores; "
                "--idle-wait sets the limit)",
                file=sys.stderr,
            )
            announced = True
    return time.perf_counter() - started


def launch_case(spec: CaseSpec, timeout_s: float) -> dict[str, Any]:
    """Run one case in a fresh child process; return its record, with status "ok", "timeout" or "failed".

    A second child, started only once the first has checked and timed the path, measures its memory
    (measure_memory); each child gets timeout_s. The record also gives the CPU cores that other processes kept busy meanwhile (other_cpu_cores)
    and the hypervisor's steal time (steal_cpu_cores), both averaged over the case's wall time.
    """
    record: dict[str, Any] = {"tier": spec.tier, "tokens": spec.tokens, "path": spec.path}
    command = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(spec.__dict__)]
    busy_before, steal_before = read_cpu_seconds()
    own_before = own_cpu_seconds()
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        completed = None
    record["wall_s"] = time.perf_counter() - started
    busy_after, steal_after = read_cpu_seconds()
    other_seconds = (busy_after - busy_before) - (own_cpu_seconds() - own_before)
    record["other_cpu_cores"] = max(other_seconds, 0.0) / record["wall_s"]
    record["steal_cpu_cores"] = (steal_after - steal_before) / record["wall_s"]

    if completed is None:
        return {**record, "status": "timeout", "message": f"stopped after the case timeout of {timeout_s:.0f} s"}
    if completed.returncode == CHECK_FAILED_EXIT:
        raise CheckFailed(completed.stderr.strip())
    if completed.returncode != 0:
        return {**record, "status": "failed", "message": _failure(completed)}
    record.update(json.loads(completed.stdout.strip().splitlines()[-1]))
    memory_command = [sys.executable, str(Path(__file__).resolve()), "--memory-case", json.dumps(spec.__dict__)]
    try:
        memory = subprocess.run(
            memory_command, env={**os.environ, **CHILD_ENVIRONMENT}, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {**record, "status": "timeout", "message": f"the memory call stopped after the case timeout of {timeout_s:.0f} s"}
    if memory.returncode != 0:
        return {**record, "status": "failed", "message": "memory call: " + _failure(memory)}
    return {**record, "status": "ok", **json.loads(memory.stdout.strip().splitlines()[-1])}


def _failure(completed: subprocess.CompletedProcess) -> str:
    tail = completed.stderr.strip().splitlines()[-5:]
    return f"exit status {completed.returncode}: " + " | ".join(tail)


def run_case_attempts(spec: CaseSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Launch a case, again up to args.retries times while other processes contend for the CPU.

    Returns the completed attempt with the least contention (chosen without looking at its times),
    with every attempt listed under "attempts".
    """
    attempts: list[dict[str, Any]] = []
    for _ in range(1 + args.retries):
        waited = wait_for_idle(args.idle_wait)
        record = launch_case(spec, args.case_timeout)
        record["idle_wait_s"] = waited
        attempts.append(record)
        if record["status"] != "ok" or record["other_cpu_cores"] <= CONTENTION_WARNING_CORES:
            break
    completed = [record for record in attempts if record["status"] == "ok"] or attempts[-1:]
    best = min(completed, key=lambda record: record["other_cpu_cores"])
    return {**best, "attempts": attempts}


# ---- output ------------------------------------------------------------------------------------------


def format_number(value: float | None, width: int, decimals: int) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:{width}.{decimals}f}"


def find_case(records: list[dict[str, Any]], tier: str, tokens: int, path: str) -> dict[str, Any] | None:
    for record in records:
        if (record["tier"], record["tokens"], record["path"]) == (tier, tokens, path):
            return record
    return None


def median_ms(record: dict[str, Any] | None, key: str = "median_ms") -> float | None:
    return record.get(key) if record and record["status"] == "ok" else None


def peak_mib(record: dict[str, Any] | None) -> float | None:
    growth = record.get("peak_rss_growth_bytes") if record and record["status"] == "ok" else None
    return None if growth is None else growth / MIB


def format_table(tier: str, sizes: tuple[int, ...], records: list[dict[str, Any]]) -> str:
    """Format one tier's results: median times, their ratio and each path's resident-set growth."""
    size_name = "T = S" if tier == "prefill" else "S"
    header = (
        f"{'tier':<8}{size_name:>8}{'dense ms':>12}{'DSA ms':>12}{'dense/DSA':>11}"
        f"{'dense MiB':>11}{'DSA MiB':>10}{'select ms':>12}{'attend ms':>12}"
    )
    lines = [header, "-" * len(header)]
    for tokens in sizes:
        dense, sparse = find_case(records, tier, tokens, "dense"), find_case(records, tier, tokens, "dsa")
        dense_ms, sparse_ms = median_ms(dense), median_ms(sparse)
        ratio = dense_ms / sparse_ms if dense_ms is not None and sparse_ms is not None else None
        lines.append(
            f"{tier:<8}{tokens:>8}{format_number(dense_ms, 12, 1)}{format_number(sparse_ms, 12, 1)}"
            f"{format_number(ratio, 11, 3)}{format_number(peak_mib(dense), 11, 1)}"
            f"{format_number(peak_mib(sparse), 10, 1)}{format_number(median_ms(sparse, 'median_select_ms'), 12, 1)}"
            f"{format_number(median_ms(sparse, 'median_attention_ms'), 12, 1)}"
        )
    for record in records:
        if record["tier"] != tier:
            continue
        where = f"  {record['path']} at {record['tokens']} tokens"
        if record["status"] != "ok":
            lines.append(f"{where}: {record['status']}, {record['message']}")
        elif record["other_cpu_cores"] > CONTENTION_WARNING_CORES:
            lines.append(
                f"{where}: other processes kept {record['other_cpu_cores']:.2f} CPU cores busy "
                f"(least contended of {len(record['attempts'])} attempts), so its time is inflated"
            )
    return "\n".join(lines)


def write_plots(results: dict[str, Any], output: Path) -> list[Path]:
    """Write log-log plots of median time and resident-set growth against tokens; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # One panel per tier that ran: a decode-only run gets no empty prefill panel.
    tiers = [tier for tier in TIERS if any(case["tier"] == tier for case in results["cases"])]
    for metric, label, suffix in (("time", "median time (ms)", "time"), ("memory", "peak RSS growth (MiB)", "memory")):
        figure, axes = plt.subplots(1, len(tiers), figsize=(5.5 * len(tiers), 4.2), squeeze=False)
        for axis, tier in zip(axes[0], tiers):
            for path, marker in zip(PATHS, ("o", "s")):
                points = []
                for tokens in results["settings"]["sizes"][tier]:
                    record = find_case(results["cases"], tier, tokens, path)
                    value = median_ms(record) if metric == "time" else peak_mib(record)
                    if value is not None and value > 0:
                        points.append((tokens, value))
                if points:
                    axis.plot(*zip(*points), marker=marker, label="dense SDPA" if path == "dense" else "DSA")
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("tokens (T = S)" if tier == "prefill" else "cached tokens S (one query)")
            axis.set_ylabel(label)
            axis.set_title(tier)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend()
        settings = results["settings"]
        inputs = f"{settings.get('inputs', 'random')} inputs, index scores {settings.get('score_dtype', 'float32')}"
        # Two lines, so that a one-panel figure does not clip the title.
        figure.suptitle(
            f"{settings['shape']} layer, fp32, top_k {settings['top_k']}\n{inputs}, {results['machine']['cpu_model']}"
        )
        figure.tight_layout()
        path = output.with_name(f"{output.stem}-{suffix}.png")
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written


def write_results(results: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


# ---- command line ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Time DSA (indexer scores + top-k selection + sparse attention) against dense SDPA on "
            f"one layer shape (--shape), fp32 attention on the CPU. Default sweep: prefill at T = "
            f"{', '.join(map(str, PREFILL_TOKENS))} tokens and a decode step against caches of "
            f"{', '.join(map(str, DECODE_CACHE_TOKENS))} tokens; with --inputs real, prefill at "
            f"{', '.join(map(str, REAL_PREFILL_TOKENS))} and decode at {', '.join(map(str, REAL_DECODE_CACHE_TOKENS))}."
        )
    )

    parser.add_argument(
        "--quick", action="store_true",
        help=f"run the short sweep instead: prefill at {', '.join(map(str, QUICK_PREFILL_TOKENS))} tokens, "
        f"decode against caches of {', '.join(map(str, QUICK_DECODE_CACHE_TOKENS))} tokens",
    )

    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default="smollm2-135m",
        help="layer shape: smollm2-135m (H 9, HKV 3, D 64) or qwen3-4b (H 32, HKV 8, D 128) (default smollm2-135m)",
    )

    parser.add_argument(
        "--tiers", nargs="+", choices=TIERS, default=list(TIERS),
        help="tiers to run (default: prefill decode)",
    )

    parser.add_argument(
        "--prefill-tokens", type=int, nargs="+",
        help="prefill lengths T = S to run instead of the sweep's (tokens)",
    )

    parser.add_argument(
        "--decode-tokens", type=int, nargs="+",
        help="decode cache lengths S to run instead of the sweep's (tokens)",
    )

    parser.add_argument(
        "--repeats", type=int, default=3,
        help="timed calls per case after one untimed warm-up; the table shows their median (count, default 3)",
    )

    parser.add_argument(
        "--top-k", type=int, default=2048,
        help="keys each query attends to on the DSA path (tokens, default 2048)",
    )

    parser.add_argument(
        "--chunk-size", type=int, default=256,
        help="queries per chunk in select_topk_torch and sparse_attention_torch (queries, default 256)",
    )

    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random inputs (integer, default 0)",
    )

    parser.add_argument(
        "--inputs", choices=INPUTS, default="random",
        help="random: random tensors (default). real: the attention and indexer inputs of one layer of the "
        "default model (SmolLM2-135M-Instruct with the shipped adapter) on the first T tokens of --text, "
        "captured before the cases run; needs --shape smollm2-135m",
    )

    parser.add_argument(
        "--text", type=Path, default=DEFAULT_TEXT,
        help=f"text file read with --inputs real (path, default {DEFAULT_TEXT})",
    )

    parser.add_argument(
        "--real-layer", type=int, default=DEFAULT_REAL_LAYER,
        help=f"layer whose inputs --inputs real captures; must be sparse in the adapter (index, default {DEFAULT_REAL_LAYER})",
    )

    parser.add_argument(
        "--score-dtype", choices=sorted(SCORE_DTYPES), default="float32",
        help="dtype of the q . k product of the index scores on the DSA path (default float32); bfloat16 "
        "rounds q, k and each logit to bf16, as DSAConfig.indexer_score_dtype does",
    )

    parser.add_argument(
        "--case-timeout", type=float, default=900.0,
        help="wall-clock limit of one case (warm-up, check and repeats of one path at one size); a case "
        "that exceeds it is stopped and reported as timed out (seconds, default 900)",
    )

    parser.add_argument(
        "--idle-wait", type=float, default=300.0,
        help="before each case, wait up to this long for other processes to leave the CPU idle "
        f"(at most {CONTENTION_WARNING_CORES} cores busy); 0 starts at once (seconds, default 300)",
    )

    parser.add_argument(
        "--retries", type=int, default=1,
        help=f"extra attempts of a case during which other processes kept more than "
        f"{CONTENTION_WARNING_CORES} CPU cores busy; the table shows the least contended attempt and "
        "the JSON all of them (count, default 1)",
    )

    parser.add_argument(
        "--output", type=Path,
        help="JSON file for the raw results: every repeat, the settings and the machine "
        "(path, default bench-results/ops-SHAPE.json)",
    )

    parser.add_argument(
        "--plot", action="store_true",
        help="also write log-log plots of time and memory against tokens as PNG files next to --output "
        "(ops-SHAPE-time.png and ops-SHAPE-memory.png for the default output); needs matplotlib",
    )

    # Internal: run one case in this process and print its result (how the parent starts each child).
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("repeats", "top_k", "chunk_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid; expected an integer >= 1.")
    if args.retries < 0 or args.idle_wait < 0:
        parser.error(f"--retries={args.retries} and --idle-wait={args.idle_wait} must not be negative.")
    if args.output is None:
        args.output = Path(f"bench-results/ops-{args.shape}.json")
    if args.case_timeout <= 0:
        parser.error(f"--case-timeout={args.case_timeout} is invalid; expected a positive number of seconds.")
    if args.inputs == "random" and args.case is None:
        for option, value, default in (("--text", args.text, DEFAULT_TEXT), ("--real-layer", args.real_layer, DEFAULT_REAL_LAYER)):
            if value != default:
                parser.error(f"{option} {value} applies to --inputs real only; add --inputs real or drop {option}.")
    if args.inputs == "real" and args.case is None:
        if args.shape != "smollm2-135m":
            parser.error(f"--inputs real captures SmolLM2-135M's layers; --shape {args.shape} has no model here. Use --shape smollm2-135m.")
        if not args.text.is_file():
            parser.error(f"--text {args.text} is not a file; --inputs real needs a text file.")
    return args


def sweep_sizes(quick: bool, inputs: str = "random") -> dict[str, tuple[int, ...]]:
    if quick:
        return {"prefill": QUICK_PREFILL_TOKENS, "decode": QUICK_DECODE_CACHE_TOKENS}
    if inputs == "real":
        return {"prefill": REAL_PREFILL_TOKENS, "decode": REAL_DECODE_CACHE_TOKENS}
    return {"prefill": PREFILL_TOKENS, "decode": DECODE_CACHE_TOKENS}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.case is not None:
        return case_main(args.case)
    if args.memory_case is not None:
        return memory_case_main(args.memory_case)

    sizes = sweep_sizes(args.quick, args.inputs)
    if args.prefill_tokens:
        sizes["prefill"] = tuple(args.prefill_tokens)
    if args.decode_tokens:
        sizes["decode"] = tuple(args.decode_tokens)
    sizes = {tier: sizes[tier] for tier in args.tiers}
    shape = SHAPES[args.shape]
    results: dict[str, Any] = {
        "command": [Path(sys.executable).name, *sys.argv],
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "sizes": sizes, "top_k": args.top_k, "chunk_size": args.chunk_size, "repeats": args.repeats,
            "warmup_calls": 1, "seed": args.seed, "case_timeout_s": args.case_timeout,
            "idle_wait_s": args.idle_wait, "retries": args.retries, "contention_cores": CONTENTION_WARNING_CORES,
            "shape": args.shape, "batch": BATCH, "query_heads": shape.heads, "kv_heads": shape.kv_heads,
            "head_dim": shape.head_dim, "indexer_heads": shape.indexer_heads,
            "indexer_head_dim": shape.indexer_head_dim, "indexer_source": shape.indexer_source,
            "memory_call_mmap_threshold_bytes": MMAP_THRESHOLD, "score_dtype": args.score_dtype,
            "inputs": args.inputs,
            **({"text": str(args.text), "real_layer": args.real_layer} if args.inputs == "real" else {}),
        },
        "machine": collect_machine_info(),
        "cases": [],
    }
    print(format_machine_info(results["machine"]))
    print(
        f"shapes        {args.shape}: B={BATCH} H={shape.heads} HKV={shape.kv_heads} D={shape.head_dim}, indexer "
        f"HI={shape.indexer_heads} DI={shape.indexer_head_dim} ({shape.indexer_source}), top_k={args.top_k}, chunk_size={args.chunk_size}, "
        f"{args.inputs} inputs, index scores {args.score_dtype}, "
        f"median of {args.repeats} after 1 warm-up"
    )

    real_files: dict[int, Path] = {}
    scratch = tempfile.TemporaryDirectory(prefix="bench-ops-inputs-")
    try:
        results["small_checks"] = check_small_shapes(shape, args.top_k, args.chunk_size, args.seed, args.score_dtype)
        print(f"checks        both paths match the references at T={SMALL_CHECK_TOKENS} (prefill and decode)")
        if args.inputs == "real":
            needed = [tokens for tier in args.tiers for tokens in sizes[tier]]
            real_files = capture_real_inputs(needed, args.text, args.real_layer, Path(scratch.name))
            print(f"inputs        layer {args.real_layer} of SmolLM2-135M-Instruct with the shipped adapter, on {args.text}")
        specs = [
            CaseSpec(
                tier, tokens, path, args.top_k, args.chunk_size, args.repeats, args.seed, args.shape, args.score_dtype,
                args.inputs, str(real_files[tokens]) if real_files else None,
            )
            for tier in args.tiers for tokens in sizes[tier] for path in PATHS
        ]
        progress = tqdm(specs, unit="case", file=sys.stderr)
        for spec in progress:
            progress.set_description(f"{spec.tier} {spec.tokens} {spec.path}")
            record = run_case_attempts(spec, args)
            results["cases"].append(record)
            summary = f"median {record['median_ms']:.1f} ms" if record["status"] == "ok" else record["message"]
            progress.write(
                f"{spec.tier:<8}{spec.tokens:>8} {spec.path:<6}{record['status']:<8}{summary}, "
                f"other processes {record['other_cpu_cores']:.2f} cores, attempts {len(record['attempts'])}",
                file=sys.stderr,
            )
    except CheckFailed as error:
        write_results(results, args.output)
        print(f"error: {error}\nNothing more was timed; partial results are in {args.output}.", file=sys.stderr)
        return 1
    finally:
        scratch.cleanup()

    results["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print()
    for tier in args.tiers:
        print(format_table(tier, sizes[tier], results["cases"]))
        print()
    print(
        "ms: median wall time of one call. dense/DSA > 1 means DSA is faster. MiB: peak resident-set growth "
        "of the case's process over its RSS just before the timed calls (inputs excluded). select/attend: "
        "the DSA time split into select_topk_torch and sparse_attention_torch; for a prefill, which runs both "
        "per block, select is the time of its select_topk_torch calls in one more call and attend is the rest "
        "of that call."
    )
    contended = [record for record in results["cases"] if record["other_cpu_cores"] > CONTENTION_WARNING_CORES]
    if contended:
        worst = max(record["other_cpu_cores"] for record in contended)
        print(
            f"warning: other processes kept up to {worst:.2f} CPU cores busy during {len(contended)} of "
            f"{len(results['cases'])} cases (other_cpu_cores in the JSON), so those times are inflated. "
            "Rerun on an idle machine."
        )
    write_results(results, args.output)
    print(f"raw results   {args.output}")
    if args.plot:
        try:
            plots = write_plots(results, args.output)
        except ImportError:
            print("plots         skipped: matplotlib is not installed (pip install matplotlib)")
        else:
            print(f"plots         {', '.join(map(str, plots))}")
    # A timed-out case is a result (its size is reported as dropped); a crashed one is an error.
    crashed = [record for record in results["cases"] if record["status"] == "failed"]
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
