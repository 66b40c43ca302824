"""DSA on a real model: hide a fact in a long real text, ask for it, answer with sparse attention.

Run `python demo.py` with no arguments: it loads the embedded SmolLM2-135M-Instruct and the indexer
adapter shipped in adapters/, builds a prompt of 3000 tokens of Poe (held-out text the
indexer never saw) with a pass key hidden in it, and generates the answer twice, with DSA and with dense
attention. It prints both answers, how many keys each decoded token attended against the context
length, and the prefill and per-token times of both.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, StaticCache

import dsa
from dsa.evaluation.passkey import build_passkey_prompt
from dsa.ops._cpu import cpu_kernels

ROOT = Path(__file__).resolve().parent
DEFAULT_ADAPTER = ROOT / "adapters" / "smollm2-135m"
DEFAULT_TEXT = ROOT / "examples" / "data" / "poe_excerpt.txt"

logger = logging.getLogger("demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="Model folder, or 'default' for the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--adapter", default=str(DEFAULT_ADAPTER), help="Indexer adapter folder (dsa.save_indexer / dsa train output).")
    parser.add_argument("--prompt_file", default=str(DEFAULT_TEXT), help="UTF-8 text used as the long context.")
    parser.add_argument("--context_tokens", type=int, default=3000, help="Prompt length in tokens, including the hidden fact and the question (default: %(default)s).")
    parser.add_argument("--top_k", type=int, help="Keys each query attends to (default: the adapter's top_k).")
    parser.add_argument("--dense_layers", type=int, nargs="*",
                        help="Layer indices that keep dense attention; give the flag alone for none (default: the adapter's dense_layers).")
    parser.add_argument("--depth", type=float, default=0.3, help="Where the fact is hidden, as a fraction of the context from 0 (start) to 1 (end) (default: %(default)s).")
    parser.add_argument("--max_new_tokens", type=int, default=12, help="Tokens to generate, at least 1 (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=1234, help="Seed of the hidden pass key (default: %(default)s).")
    parser.add_argument(
        "--indexer_score_dtype", choices=("float32", "bfloat16"),
        help="dtype of the indexer's q . k product; bfloat16 halves the indexer key cache and can speed up selection on "
        "CPUs with AVX512-BF16, see docs/benchmarks.md (default: the adapter's setting, float32 unless set).",
    )
    return parser


def load(
    model_name: str, adapter: str, top_k: int | None, dense_layers: list[int] | None = None, indexer_score_dtype: str | None = None
):
    path = dsa.default_model_path() if model_name == "default" else Path(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    dsa.load_indexer(model, adapter)
    if top_k is not None:
        dsa.update_config(model, top_k=top_k)
    if dense_layers is not None:
        dsa.update_config(model, dense_layers=dense_layers)
    if indexer_score_dtype is not None:
        dsa.update_config(model, indexer_score_dtype=indexer_score_dtype)
    return model, tokenizer


@torch.no_grad()
def generate_timed(model, prompt: torch.Tensor, max_new_tokens: int, label: str) -> dict:
    """Decode greedily, timing prefill and each step apart; return tokens, times and key counts.

    The cache is preallocated for the prompt and the new tokens, so a step writes in place instead of
    copying every layer's keys and values as a growing DynamicCache would.
    """
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + max_new_tokens)
    started = time.perf_counter()
    logits = model(prompt, cache=cache, use_cache=True).logits[:, -1]
    prefill = time.perf_counter() - started
    tokens, step_times, keys = [], [], []
    for _ in tqdm(range(max_new_tokens), desc=f"{label} decode", unit="token", leave=False):
        token = logits.argmax(dim=-1, keepdim=True)
        tokens.append(int(token))
        started = time.perf_counter()
        logits = model(token, cache=cache, use_cache=True).logits[:, -1]
        step_times.append(time.perf_counter() - started)
        counts = dsa.keys_per_query(model)
        if counts:
            keys.append(max(int(c.max()) for c in counts.values()))
    return {"tokens": tokens, "prefill_s": prefill, "per_token_ms": 1000 * sum(step_times) / len(step_times), "keys": keys}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens} is invalid; expected at least 1 token.")
    if not 0.0 <= args.depth <= 1.0:
        raise ValueError(f"--depth {args.depth} is invalid; expected a fraction from 0 (start) to 1 (end).")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top_k {args.top_k} is invalid; expected at least 1 key per query, or leave it out for the adapter's top_k.")
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    logger.info("Loading %s with the indexer adapter %s", args.model, args.adapter)
    model, tokenizer = load(args.model, args.adapter, args.top_k, args.dense_layers, args.indexer_score_dtype)
    runtime = dsa.get_runtime(model)
    top_k, dense_layers = runtime.config.top_k, list(runtime.config.dense_layers)

    key = str(random.Random(args.seed).randrange(10000, 99999))
    text = Path(args.prompt_file).read_text(encoding="utf-8")
    filler = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = build_passkey_prompt(tokenizer, filler, args.context_tokens, args.depth, key)
    logger.info("Prompt: %d tokens of %s, pass key %s hidden at %.0f%% depth; top_k %d", prompt.shape[1], Path(args.prompt_file).name, key, 100 * args.depth, top_k)

    # The CPU kernels compile on first use (about half a minute); build them before anything is timed.
    if next(model.parameters()).device.type == "cpu":
        cpu_kernels()

    results = {}
    for mode in ("sparse", "dense"):
        dsa.set_mode(model, mode)
        logger.info("Generating with %s attention ...", "DSA" if mode == "sparse" else "dense")
        results[mode] = generate_timed(model, prompt, args.max_new_tokens, mode)
    dsa.set_mode(model, "sparse")

    context = prompt.shape[1]
    print()
    print(f"hidden pass key: {key}    context: {context} tokens    top_k: {top_k}    index scores: {runtime.config.indexer_score_dtype}")
    layers = len(runtime.layers)
    print(f"sparse layers: {layers - len(dense_layers)} of {layers}" + (f" (dense: {dense_layers})" if dense_layers else ""))
    for mode, label in (("sparse", "DSA  "), ("dense", "dense")):
        result = results[mode]
        answer = tokenizer.decode(result["tokens"]).strip().replace("\n", " ")
        found = "found" if key in answer else "not found"
        print(f"{label} answer: {answer!r} ({found})")
    keys = results["sparse"]["keys"]
    if keys:
        print(f"keys attended per decoded token (DSA): {min(keys)}-{max(keys)} of {context}-{context + len(keys) - 1} in context "
              f"({100 * max(keys) / context:.1f}%)")
    else:
        print("keys attended per decoded token (DSA): every key, since no layer is sparse")
    print(f"{'':6}{'prefill (s)':>12}{'per token (ms)':>16}")
    for mode, label in (("sparse", "DSA"), ("dense", "dense")):
        print(f"{label:6}{results[mode]['prefill_s']:>12.2f}{results[mode]['per_token_ms']:>16.1f}")
    print("Times are wall-clock on this machine; see docs/benchmarks.md for the operator benchmarks.")
    return 0


if __name__ == "__main__":
    from dsa.cli import run_console

    sys.exit(run_console(main, "demo.py"))
