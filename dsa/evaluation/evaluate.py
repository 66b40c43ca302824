"""Compare dense attention, the oracle selection and the trained indexer on held-out text.

For each context length L the text is cut into windows of L tokens. Each attention kind reads the same
windows:

- dense: the original attention;
- oracle: sparse attention over the top_k keys with the largest true attention mass (averaged over the
  query heads), the best selection any indexer can make at that top_k;
- dsa: sparse attention over the indexer's top_k keys.

Reported per (L, top_k): perplexity of each kind, the mean share of the dense attention mass covered by
the oracle's and the indexer's selections (per layer and averaged), and passkey retrieval accuracy
(dense and DSA at the model's configured top_k).
"""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

import dsa
from dsa.evaluation.passkey import build_passkey_prompt
from dsa.integrations.hf.convert import get_runtime

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("dense", "oracle", "dsa")


@dataclass
class EvalSettings:
    context_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    top_ks: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    windows: int = 2
    """Windows of L tokens per context length (perplexity and recall are averaged over them)."""
    passkey_trials: int = 20
    passkey_top_k: int | None = None
    """top_k of the DSA passkey runs; None keeps the model's configured top_k."""
    seed: int = 0
    logits_chunk: int = 1024
    """Tokens per chunk of the output projection, so [L, vocab] logits are never held at once."""

    def validate(self) -> None:
        for name in ("context_lengths", "top_ks"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 2 for v in values):
                raise ValueError(f"{name}={values!r} is invalid; expected a non-empty list of integers >= 2.")
        if self.windows < 1 or self.passkey_trials < 0:
            raise ValueError(f"windows={self.windows}, passkey_trials={self.passkey_trials} are invalid; expected windows >= 1 and trials >= 0.")


def _windows(token_ids: list[int], length: int, count: int) -> list[torch.Tensor]:
    available = len(token_ids) // length
    if available == 0:
        raise ValueError(f"the evaluation text has {len(token_ids)} tokens, fewer than one window of {length}; use a longer text or shorter --context_lengths.")
    step = max(1, available // count)
    return [torch.tensor(token_ids[i * length : (i + 1) * length]).unsqueeze(0) for i in range(0, available, step)][:count]


@torch.no_grad()
def _negative_log_likelihood(model, input_ids: torch.Tensor, logits_chunk: int) -> tuple[float, int]:
    """Return (summed NLL, predicted tokens) of a window, projecting to the vocabulary chunk by chunk."""
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    for start in range(0, input_ids.shape[1] - 1, logits_chunk):
        stop = min(start + logits_chunk, input_ids.shape[1] - 1)
        logits = head(hidden[:, start:stop]).float()
        targets = input_ids[:, start + 1 : stop + 1]
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        count += targets.numel()
    return total, count


def _configure(model, kind: str, top_k: int | None, measure_recall: bool) -> None:
    runtime = get_runtime(model)
    if kind == "dense":
        dsa.set_mode(model, "dense")
    else:
        dsa.set_mode(model, "sparse")
        runtime.selection = "oracle" if kind == "oracle" else "indexer"
    if top_k is not None:
        dsa.update_config(model, top_k=top_k)
    runtime.measure_recall = measure_recall
    runtime.recall_rows = 0  # every query row: the evaluation reports recall, training logs only sample it


def _layer_recalls(model) -> dict[int, float]:
    return {state.layer_idx: float(state.recall) for state in get_runtime(model).layers if state.recall is not None}


def _perplexity_and_recall(model, windows, kind, top_k, settings, progress) -> dict[str, Any]:
    _configure(model, kind, top_k, measure_recall=kind != "dense")
    total, count = 0.0, 0
    recall_sums: dict[int, float] = {}
    for window in windows:
        nll, tokens = _negative_log_likelihood(model, window, settings.logits_chunk)
        total, count = total + nll, count + tokens
        for layer, value in _layer_recalls(model).items():
            recall_sums[layer] = recall_sums.get(layer, 0.0) + value
        progress.update(1)
    result: dict[str, Any] = {"perplexity": math.exp(total / count), "tokens": count}
    if recall_sums:
        per_layer = {layer: value / len(windows) for layer, value in sorted(recall_sums.items())}
        result["recall_per_layer"] = per_layer
        result["recall_mean"] = sum(per_layer.values()) / len(per_layer)
    return result


@torch.no_grad()
def _passkey_accuracy(model, tokenizer, filler_ids, length, kind, top_k, trials, seed, progress) -> float:
    _configure(model, kind, top_k, measure_recall=False)
    rng = random.Random(f"{seed}-{length}")
    hits = 0
    for _ in range(trials):
        key = str(rng.randrange(10000, 99999))
        # A random stretch of the text as filler, the needle at a random depth.
        offset = rng.randrange(0, max(1, len(filler_ids) - length))
        prompt = build_passkey_prompt(tokenizer, filler_ids[offset:], length, rng.random(), key)
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        answer = tokenizer.decode(output[0, prompt.shape[1] :])
        number = re.search(r"\d+", answer)
        hits += int(number is not None and number.group() == key)
        progress.update(1)
    return hits / trials if trials else float("nan")


def evaluate(model, tokenizer, text: str, settings: EvalSettings | None = None, *, show_progress: bool = True) -> dict[str, Any]:
    """Run the comparison on a converted model and return the results as a JSON-ready dict."""
    settings = settings or EvalSettings()
    settings.validate()
    runtime = get_runtime(model)
    saved = (runtime.mode, runtime.selection, runtime.config, runtime.measure_recall)
    passkey_top_k = settings.passkey_top_k or runtime.config.top_k
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = {length: _windows(token_ids, length, settings.windows) for length in settings.context_lengths}
    steps = sum(len(w) for w in windows.values()) * (1 + 2 * len(settings.top_ks))
    steps += 2 * settings.passkey_trials * len(settings.context_lengths)
    results: dict[str, Any] = {"settings": asdict(settings), "dsa_config": runtime.config.to_dict(), "lengths": {}}
    model.eval()
    try:
        with tqdm(total=steps, desc="dsa eval", unit="run", disable=not show_progress) as progress:
            for length in settings.context_lengths:
                entry: dict[str, Any] = {"dense": _perplexity_and_recall(model, windows[length], "dense", None, settings, progress)}
                for top_k in settings.top_ks:
                    entry[f"top_k={top_k}"] = {
                        kind: _perplexity_and_recall(model, windows[length], kind, top_k, settings, progress)
                        for kind in ("oracle", "dsa")
                    }
                if settings.passkey_trials:
                    entry["passkey"] = {
                        "top_k": passkey_top_k,
                        "dense": _passkey_accuracy(model, tokenizer, token_ids, length, "dense", None, settings.passkey_trials, settings.seed, progress),
                        "dsa": _passkey_accuracy(model, tokenizer, token_ids, length, "dsa", passkey_top_k, settings.passkey_trials, settings.seed, progress),
                    }
                results["lengths"][str(length)] = entry
                logger.info("Context %d: dense perplexity %.3f", length, entry["dense"]["perplexity"])
    finally:
        runtime.mode, runtime.selection, runtime.measure_recall = saved[0], saved[1], saved[3]
        dsa.update_config(model, top_k=saved[2].top_k)
    return results
