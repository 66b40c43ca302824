"""Training data for `dsa train`: local files or cached `datasets`, tokenised, packed or chat-masked.

Three record kinds, chosen from the columns:

- plain text (`--text_column`, default "text", or .txt files): concatenated with a blank line between
  documents and packed into sequences of exactly `model_max_length` tokens; every token is a label;
- chat (`messages`: a list of {"role", "content"}): rendered with the tokenizer's chat template, one
  sequence per record truncated to `model_max_length`, labels only on assistant tokens;
- instruction (`prompt` and `response`): treated as a two-turn chat (user, assistant).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

LOADERS: dict[str, str] = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
IGNORE_INDEX = -100


class DataError(ValueError):
    """Raised before training starts when the dataset cannot produce training sequences."""


def _data_files(path: Path) -> tuple[str, list[str]]:
    """Return (datasets loader name, files) for a file or a folder of files of one supported type."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOADERS and not p.name.startswith("."))
        if not files:
            raise DataError(f"no {sorted(LOADERS)} files found in folder {path}.")
    else:
        if path.suffix not in LOADERS:
            raise DataError(f"unsupported data file {path}: expected one of {sorted(LOADERS)}.")
        files = [path]
    loaders = {LOADERS[p.suffix] for p in files}
    if len(loaders) > 1:
        raise DataError(f"{path} mixes file types {sorted({p.suffix for p in files})}; put one type per folder.")
    for file in files:
        if file.stat().st_size == 0:
            raise DataError(f"data file {file} is empty; add text to it, or remove it from the data folder.")
    return loaders.pop(), [str(p) for p in files]


def load_records(name_or_path: str, split: str = "train", config_name: str | None = None):
    """Load raw records as a `datasets.Dataset` from local files or a dataset in the local cache.

    A dataset name is read by `datasets.load_dataset(name, config_name, split=split)`, which falls back
    to the copy a previous run left in the `datasets` cache when the hub cannot be reached; with
    HF_HUB_OFFLINE=1 it goes to the cache without trying the network.
    """
    import datasets

    if not name_or_path:
        raise DataError("--dataset_name_or_path is missing: pass a .txt/.jsonl/.json/.parquet file, a folder or a dataset name.")
    path = Path(name_or_path).expanduser()
    if path.exists():
        loader, files = _data_files(path)
        extra = {"sample_by": "paragraph"} if loader == "text" else {}
        try:
            records = datasets.load_dataset(loader, data_files=files, split="train", **extra)
        except Exception as error:  # datasets raises many types for malformed files
            raise DataError(f"could not read {path} as {loader} data: {error}") from error
    else:
        try:
            records = datasets.load_dataset(name_or_path, config_name, split=split)
        except Exception as error:
            raise DataError(
                f"{name_or_path!r} is neither a local file or folder nor a dataset in the local datasets cache: "
                f"{str(error).rstrip('.')}. Pass a .txt, .jsonl, .json or .parquet file or folder, or load the dataset once with "
                "datasets.load_dataset where the hub is reachable so that it is cached."
            ) from error
    if len(records) == 0:
        raise DataError(f"{name_or_path} contains no records.")
    return records


def record_kind(columns: list[str], text_column: str) -> str:
    if "messages" in columns:
        return "chat"
    if "prompt" in columns and ("response" in columns or "completion" in columns):
        return "instruction"
    if text_column in columns:
        return "text"
    raise DataError(
        f"records have columns {columns}; expected '{text_column}' (plain text, set with --text_column), "
        "'messages' (chat), or 'prompt' and 'response' (instruction)."
    )


def _pack_text(records, tokenizer, text_column: str, length: int) -> list[list[int]]:
    """Tokenise every document, join them and cut the stream into sequences of `length` tokens."""
    stream: list[int] = []
    for text in records[text_column]:
        if text:
            stream.extend(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
    if len(stream) < length:
        raise DataError(
            f"the text has {len(stream)} tokens in all, fewer than one sequence of --model_max_length={length}; "
            "use more text or a shorter --model_max_length."
        )
    return [stream[start : start + length] for start in range(0, len(stream) - length + 1, length)]


def _chat_ids(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Render a chat and return (input ids, labels) with labels only on assistant turns.

    Assistant spans are found by rendering growing prefixes of the chat: the tokens a complete assistant
    turn adds after its generation prompt are its labels.
    """
    ids: list[int] = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for turn, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:turn], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
        stop = len(tokenizer.apply_chat_template(messages[: turn + 1], tokenize=True, return_dict=True)["input_ids"])
        labels[start:stop] = ids[start:stop]
    return ids, labels


def _chat_sequences(records, tokenizer, kind: str, length: int) -> list[tuple[list[int], list[int]]]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("chat and instruction records need a tokenizer with a chat template; this tokenizer has none.")
    sequences = []
    for record in records:
        if kind == "chat":
            messages = record["messages"]
        else:
            response = record.get("response", record.get("completion"))
            messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": response}]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise DataError(f"a chat record has malformed messages {str(messages)[:200]}; expected a list of {{'role', 'content'}}.")
        ids, labels = _chat_ids(tokenizer, messages)
        ids, labels = ids[:length], labels[:length]
        if any(label != IGNORE_INDEX for label in labels):
            sequences.append((ids, labels))
    if not sequences:
        raise DataError(f"no record has an assistant token within the first --model_max_length={length} tokens.")
    return sequences


class TokenisedDataset(torch.utils.data.Dataset):
    """Training sequences as dicts of input_ids and labels (lists of ints)."""

    def __init__(self, sequences: list[tuple[list[int], list[int]]], kind: str) -> None:
        self.sequences = sequences
        self.kind = kind

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        ids, labels = self.sequences[index]
        return {"input_ids": ids, "labels": labels}


def build_dataset(
    name_or_path: str,
    tokenizer,
    model_max_length: int,
    *,
    split: str = "train",
    config_name: str | None = None,
    text_column: str = "text",
    max_sequences: int | None = None,
) -> TokenisedDataset:
    """Load, tokenise and pack or mask the training data; raise `DataError` with the fix on bad data."""
    if model_max_length < 2:
        raise DataError(f"--model_max_length={model_max_length} is invalid; expected at least 2 tokens.")
    records = load_records(name_or_path, split, config_name)
    kind = record_kind(list(records.column_names), text_column)
    if kind == "text":
        sequences = [(ids, list(ids)) for ids in _pack_text(records, tokenizer, text_column, model_max_length)]
    else:
        sequences = _chat_sequences(records, tokenizer, kind, model_max_length)
    if max_sequences is not None:
        sequences = sequences[:max_sequences]
    logger.info("Training data: %d %s sequences of up to %d tokens from %s", len(sequences), kind, model_max_length, name_or_path)
    return TokenisedDataset(sequences, kind)


@dataclass
class PaddingCollator:
    """Right-pad a batch to its longest sequence; padding gets label -100 and attention mask 0."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            size = len(feature["input_ids"])
            input_ids[row, :size] = torch.tensor(feature["input_ids"])
            labels[row, :size] = torch.tensor(feature["labels"])
            attention_mask[row, :size] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
