"""The pass-key prompt shared by `dsa eval` and demo.py: a number hidden in long text, asked for at the end.

The wording was picked on SmolLM2-135M-Instruct with dense attention: with this needle it answers
correctly at 2000 and 3000 tokens and depths 0.2 to 0.8, while a plainer needle ("The pass key is N.
Remember it.") was mostly missed.
"""

from __future__ import annotations

import torch

QUESTION = "\n\nQuestion: What is the secret pass key?\nAnswer: The secret pass key is"


def needle(key: str) -> str:
    return f"\n\nIMPORTANT NOTE: The secret pass key is {key}. The secret pass key is {key}.\n\n"


def build_passkey_prompt(tokenizer, filler_ids: list[int], length: int, depth: float, key: str) -> torch.Tensor:
    """Return input ids [1, length]: filler tokens with the needle at `depth` (0 = start, 1 = end), then the question."""
    needle_ids = tokenizer(needle(key), add_special_tokens=False)["input_ids"]
    question_ids = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    budget = length - len(needle_ids) - len(question_ids)
    if budget < 1:
        minimum = len(needle_ids) + len(question_ids) + 1
        raise ValueError(f"a pass-key prompt of {length} tokens is too short for the needle and the question; use a length of at least {minimum} tokens.")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} is invalid; expected a fraction from 0 (start) to 1 (end).")
    if len(filler_ids) < budget:
        raise ValueError(
            f"a pass-key prompt of {length} tokens needs {budget} filler tokens but the text has {len(filler_ids)}; "
            "use a longer text or a shorter length."
        )
    filler = filler_ids[:budget]
    cut = int(depth * len(filler))
    return torch.tensor(filler[:cut] + needle_ids + filler[cut:] + question_ids).unsqueeze(0)
