"""Time generation with a converted Hugging Face model against the same model with dense attention.

The model is a Llama-architecture model with the layer widths of SmolLM2-135M or Qwen3-4B, a few
layers (`--layers`) and random weights. The DSA copy is converted with `dsa.convert`, its indexer sized
by the default rule (or a DSA preset, `--dsa_preset`) and random too, because selection quality does not
change the work. For each
context length S it measures, in one process and one run:

- decode: milliseconds per generated token (greedy, batch 1) after a context of S tokens, dense vs DSA.
  The context is first run once through the DSA copy in warm-up mode (dense attention that also stores
  the indexer keys), and each path decodes from its own copy of that cache. Its keys and values are
  the dense model's, and it has the shapes a sparse prefill leaves, so the decode steps do the same
  work. The cache is a StaticCache by default (`--cache`), written in place as serving engines do;
  transformers' DynamicCache copies every layer's keys and values at each step;
- prefill (`--prefill_tokens`, shorter lengths): seconds for a forward pass over T tokens, dense vs DSA
  in sparse mode, and the peak growth of the resident set (MiB) during one more, untimed pass of each.
  Memory is measured as bench_ops.py measures operators: in a fresh child process per path and
  length, which rebuilds the same seeded models, runs one warm-up prefill and measures the next one.

Before timing, a correctness check runs: with top_k at least the context length, DSA's logits must
equal the dense model's; at each timed length, every DSA decode step must have attended exactly
top_k keys. A failed check exits with status 1 and times nothing.

    python benchmarks/bench_model.py                         # SmolLM2 widths, 4 layers, S = 8k, 16k, 32k
    python benchmarks/bench_model.py --shape qwen3-4b --layers 2 --contexts 8192 32768
    python benchmarks/bench_model.py --help
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache
from transformers.cache_utils import Cache

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dsa  # noqa: E402
from bench_ops import (  # noqa: E402
    CHILD_ENVIRONMENT,
    collect_machine_info,
    current_rss_bytes,
    format_machine_info,
    peak_rss_bytes,
    reset_peak_rss,
    strict_allocator,
)

# Llama-architecture widths: hidden, intermediate, heads, kv heads, head dim, vocabulary.
WIDTHS: dict[str, dict[str, int]] = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152},
    "qwen3-4b": {"hidden_size": 2560, "intermediate_size": 9728, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936},
}
CONTEXTS: tuple[int, ...] = (8192, 16384, 32768)
PREFILL_TOKENS: tuple[int, ...] = (4096, 8192)


class CheckFailed(RuntimeError):
    """DSA disagrees with dense attention where it must not, or attended the wrong number of keys."""


def build_models(
    shape: str, layers: int, top_k: int, max_tokens: int, seed: int, score_dtype: str = "float32",
    preset: str | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Return (dense, dsa) copies of one random model. The DSA copy is converted in sparse mode, with its
    indexer sized by `dsa.default_config` or by the DSA preset `preset`."""
    config = LlamaConfig(
        **WIDTHS[shape], num_hidden_layers=layers, max_position_embeddings=max_tokens + 64,
        rope_theta=100000.0, tie_word_embeddings=True, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    dense = LlamaForCausalLM(config).eval()
    sparse = copy.deepcopy(dense)
    dsa_config = dsa.default_config(sparse) if preset is None else dsa.DSAConfig.preset(preset)
    dsa_config.top_k = top_k
    dsa_config.indexer_score_dtype = score_dtype
    dsa_config.validate()
    dsa.convert(sparse, dsa_config, indexer_trained=True)
    return dense, sparse


@torch.no_grad()
def fill_cache(model: torch.nn.Module, context: torch.Tensor, is_dsa: bool, kind: str, steps: int) -> tuple[Cache, torch.Tensor]:
    """Run the context through the model once; return the cache and the next token (greedy).

    A "static" cache is preallocated for the context and `steps` new tokens, so a decode step writes one
    position in place. A "dynamic" cache grows by concatenation, which copies every layer's keys and
    values on each step.
    """
    if kind == "static":
        cache: Cache = StaticCache(config=model.config, max_cache_len=context.shape[1] + steps)
    else:
        cache = DynamicCache(config=model.config)
    if is_dsa:
        dsa.set_mode(model, "warmup")
    try:
        logits = model(context, cache=cache, use_cache=True, logits_to_keep=1).logits
    finally:
        if is_dsa:
            dsa.set_mode(model, "sparse")
    return cache, logits[:, -1:].argmax(dim=-1)


@torch.no_grad()
def decode(model: torch.nn.Module, cache: Cache, token: torch.Tensor, steps: int, is_dsa: bool, top_k: int) -> list[float]:
    """Generate `steps` tokens greedily; return the milliseconds of each step. For DSA, check that each
    step attended exactly top_k keys in every layer."""
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        logits = model(token, cache=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(dim=-1)
        times.append((time.perf_counter() - started) * 1e3)
        if is_dsa:
            counts = {int(count.max()) for count in dsa.keys_per_query(model).values()}
            if counts != {top_k}:
                raise CheckFailed(f"a DSA decode step attended {sorted(counts)} keys per layer; expected exactly top_k={top_k}.")
    return times


@torch.no_grad()
def check_short_context(dense: torch.nn.Module, sparse: torch.nn.Module, vocab: int, top_k: int) -> float:
    """With a context shorter than top_k, DSA selects every key: its logits must equal the dense model's."""
    ids = torch.randint(0, vocab, (1, min(top_k, 256)), generator=torch.Generator().manual_seed(0))
    expected = dense(ids).logits
    actual = sparse(ids).logits
    difference = float((actual - expected).abs().max())
    if not torch.allclose(actual, expected, atol=1e-4, rtol=1e-4):
        raise CheckFailed(f"DSA logits differ from dense by {difference:.3g} on a context shorter than top_k.")
    return difference


@torch.no_grad()
def time_prefill(model: torch.nn.Module, ids: torch.Tensor) -> float:
    started = time.perf_counter()
    model(ids, logits_to_keep=1)
    return time.perf_counter() - started


@torch.no_grad()
def prefill_peak_mib(model: torch.nn.Module, ids: torch.Tensor) -> float | None:
    """Return the growth of the resident set (MiB) during one untimed prefill of `ids`: the high-water
    mark at its end minus the RSS before it, after one warm-up prefill. Runs in a fresh child process
    started with glibc's mmap threshold fixed (see memory_case_main), as bench_ops.py measures
    operators. None where the kernel cannot reset the high-water mark."""
    model(ids, logits_to_keep=1)
    gc.collect()
    strict_allocator()
    if not reset_peak_rss():
        return None
    baseline = current_rss_bytes()
    model(ids, logits_to_keep=1)
    return (peak_rss_bytes() - baseline) / 2**20


def memory_case_main(encoded: str) -> int:
    """Entry point of a memory child: build the models as the parent did, prefill the given ids with the
    given path, and print prefill_peak_mib's result as JSON."""
    case = json.loads(encoded)
    dense, sparse = build_models(
        case["shape"], case["layers"], case["top_k"], case["max_tokens"], case["seed"], case["score_dtype"], case["preset"]
    )
    model = dense if case["path"] == "dense" else sparse
    del dense, sparse  # so that the other path's weights and indexers leave memory (`model` keeps its own)
    ids = torch.randint(0, model.config.vocab_size, (1, case["tokens"]), generator=torch.Generator().manual_seed(case["ids_seed"]))
    print(json.dumps({"peak_mib": prefill_peak_mib(model, ids)}))
    return 0


def launch_memory_case(case: dict[str, Any]) -> float | None:
    """Run prefill_peak_mib for one (path, T) in a fresh child; return MiB, or None when the child failed
    (its error goes to stderr)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory_case", json.dumps(case)]
    completed = subprocess.run(command, env={**os.environ, **CHILD_ENVIRONMENT}, capture_output=True, text=True)
    if completed.returncode != 0:
        tail = " | ".join(completed.stderr.strip().splitlines()[-5:])
        print(f"warning: the memory call of {case['path']} at T={case['tokens']} failed: {tail}", file=sys.stderr)
        return None
    return json.loads(completed.stdout.strip().splitlines()[-1])["peak_mib"]


def write_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4.2))
    rows = results["decode"]
    for key, label, marker in (("dense_ms_per_token", "dense (SDPA)", "o"), ("dsa_ms_per_token", "DSA", "s")):
        axis.plot([row["context"] for row in rows], [row[key] for row in rows], marker=marker, label=label)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("context tokens S")
    axis.set_ylabel("ms per generated token (median)")
    settings = results["settings"]
    scores = "" if settings.get("indexer_score_dtype", "float32") == "float32" else ", bf16 index scores"
    config = settings.get("dsa_config", {})
    indexer = f", indexer {config['indexer_heads']} x {config['indexer_head_dim']}" if config else ""
    axis.set_title(
        f"{settings['shape']} widths, {settings['layers']} layers, top_k {settings['top_k']}{indexer},\n"
        f"{settings.get('cache', 'dynamic')} cache, fp32{scores}"
    )
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time decoding (ms per token) and prefill (s) of a converted model against dense attention, fp32 on the CPU.",
        epilog="dense/DSA ratios above 1 mean DSA is faster.",
    )
    parser.add_argument("--shape", choices=sorted(WIDTHS), default="smollm2-135m", help="layer widths (default smollm2-135m)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the random model (count, default 4; SmolLM2-135M has 30, Qwen3-4B 36)")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS), help="context lengths S for decoding (tokens, default 8192 16384 32768)")
    parser.add_argument("--prefill_tokens", type=int, nargs="*", default=list(PREFILL_TOKENS), help="prompt lengths T for the prefill time and peak memory (tokens, default 4096 8192; none to skip)")
    parser.add_argument("--steps", type=int, default=16, help="tokens generated per context; the table shows the median step (count, default 16)")
    parser.add_argument(
        "--cache", choices=("static", "dynamic"), default="static",
        help="KV cache of both paths: static (preallocated, written in place, as serving engines do) or dynamic "
        "(transformers' default, which copies every layer's keys and values at each step; default static)",
    )
    parser.add_argument("--top_k", type=int, default=2048, help="keys each DSA query attends to (tokens, default 2048)")
    parser.add_argument(
        "--indexer_score_dtype", choices=("float32", "bfloat16"), default="float32",
        help="DSAConfig.indexer_score_dtype of the DSA model: bfloat16 runs the indexer's q . k product in bf16 and "
        "keeps its key cache in bf16 (default float32)",
    )
    parser.add_argument(
        "--dsa_preset", choices=sorted(dsa.PRESETS), default=None,
        help="size the indexer as this DSA preset does (smollm2-135m: the shipped adapter's 4 heads of 32 dims) "
        "instead of the default sizing rule (4 heads of 64 dims at SmolLM2 widths); --top_k still applies",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and token ids (default 0)")
    parser.add_argument("--output", type=Path, help="raw JSON output (default bench-results/model-SHAPE.json); a PNG plot is written next to it")
    parser.add_argument("--memory_case", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.memory_case is not None:
        return memory_case_main(args.memory_case)
    for name in ("layers", "steps", "top_k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} is invalid; expected an integer >= 1.")
    if any(length <= args.top_k for length in args.contexts):
        parser.error(f"--contexts {args.contexts}: every context must exceed --top_k={args.top_k}, or DSA attends every key.")
    output = args.output or Path(f"bench-results/model-{args.shape}.json")
    max_tokens = max([*args.contexts, *args.prefill_tokens]) + args.steps

    dense, sparse = build_models(
        args.shape, args.layers, args.top_k, max_tokens, args.seed, args.indexer_score_dtype, args.dsa_preset
    )
    vocab = dense.config.vocab_size
    results: dict[str, Any] = {
        "command": [Path(sys.executable).name, *sys.argv],
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {**vars(args), "output": str(output), "dsa_config": sparse.dsa_runtime.config.to_dict(), "widths": WIDTHS[args.shape]},
        "machine": collect_machine_info(),
        "decode": [],
        "prefill": [],
    }
    print(format_machine_info(results["machine"]))
    try:
        results["short_context_max_abs_difference"] = check_short_context(dense, sparse, vocab, args.top_k)
        print("check         DSA logits equal dense logits on a context shorter than top_k")
        generator = torch.Generator().manual_seed(args.seed)
        for context in tqdm(args.contexts, desc="decode", unit="context", file=sys.stderr):
            ids = torch.randint(0, vocab, (1, context), generator=generator)
            row: dict[str, Any] = {"context": context}
            # One fill serves both paths. In warm-up mode the DSA copy computes dense attention, so its
            # keys and values are the dense model's, and it also stores the indexer keys.
            filled, token = fill_cache(sparse, ids, True, args.cache, args.steps)
            for name, model, is_dsa in (("dense", dense, False), ("dsa", sparse, True)):
                cache = copy.deepcopy(filled)
                times = decode(model, cache, token, args.steps, is_dsa, args.top_k)
                row[f"{name}_step_ms"] = times
                row[f"{name}_ms_per_token"] = statistics.median(times)
                del cache
            del filled
            row["dense_over_dsa"] = row["dense_ms_per_token"] / row["dsa_ms_per_token"]
            results["decode"].append(row)
            tqdm.write(f"decode S={context}: dense {row['dense_ms_per_token']:.1f} ms/token, DSA {row['dsa_ms_per_token']:.1f} ms/token", file=sys.stderr)
        for tokens in tqdm(args.prefill_tokens, desc="prefill", unit="length", file=sys.stderr):
            ids = torch.randint(0, vocab, (1, tokens), generator=generator)
            row = {"tokens": tokens, "dense_s": time_prefill(dense, ids), "dsa_s": time_prefill(sparse, ids)}
            row["dense_over_dsa"] = row["dense_s"] / row["dsa_s"]
            results["prefill"].append(row)
        # Memory in fresh children, one per path and length, after every timed call: the timed calls run
        # with glibc's default allocator, whose grown heap would shape a later call's peak.
        for row in tqdm(results["prefill"], desc="prefill memory", unit="length", file=sys.stderr):
            for path in ("dense", "dsa"):
                row[f"{path}_peak_mib"] = launch_memory_case({
                    "shape": args.shape, "layers": args.layers, "top_k": args.top_k, "max_tokens": max_tokens,
                    "seed": args.seed, "score_dtype": args.indexer_score_dtype, "preset": args.dsa_preset,
                    "path": path, "tokens": row["tokens"], "ids_seed": args.seed + 1,
                })
    except CheckFailed as error:
        print(f"error: correctness check failed, nothing more is timed: {error}", file=sys.stderr)
        return 1

    print(f"\n{'S':>8}{'dense ms/token':>16}{'DSA ms/token':>14}{'dense/DSA':>11}{'dense tok/s':>13}{'DSA tok/s':>11}")
    for row in results["decode"]:
        print(
            f"{row['context']:>8}{row['dense_ms_per_token']:>16.1f}{row['dsa_ms_per_token']:>14.1f}{row['dense_over_dsa']:>11.2f}"
            f"{1e3 / row['dense_ms_per_token']:>13.1f}{1e3 / row['dsa_ms_per_token']:>11.1f}"
        )
    if results["prefill"]:
        print(f"\n{'T':>8}{'dense prefill s':>17}{'DSA prefill s':>15}{'dense/DSA':>11}{'dense MiB':>11}{'DSA MiB':>9}")
        for row in results["prefill"]:
            memory = "".join(
                f"{value:>{width}.1f}" if value is not None else f"{'n/a':>{width}}"
                for value, width in ((row["dense_peak_mib"], 11), (row["dsa_peak_mib"], 9))
            )
            print(f"{row['tokens']:>8}{row['dense_s']:>17.2f}{row['dsa_s']:>15.2f}{row['dense_over_dsa']:>11.2f}{memory}")
    results["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot = output.with_suffix(".png")
    write_plot(results, plot)
    print(f"\nraw results   {output}\nplot          {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
