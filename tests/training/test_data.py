import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dsa.training.data import IGNORE_INDEX, DataError, PaddingCollator, build_dataset


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return AutoTokenizer.from_pretrained(tokenizer_path)


def test_plain_text_packed_to_length(tokenizer, text_file):
    dataset = build_dataset(str(text_file), tokenizer, 64)
    assert dataset.kind == "text"
    assert len(dataset) > 10
    for item in (dataset[0], dataset[len(dataset) - 1]):
        assert len(item["input_ids"]) == 64
        assert item["labels"] == item["input_ids"]


def test_folder_and_formats(tokenizer, tmp_path):
    rows = [{"text": "A long sentence about the sea and the sky. " * 20} for _ in range(3)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert len(build_dataset(str(tmp_path), tokenizer, 32)) > len(build_dataset(str(tmp_path / "a.jsonl"), tokenizer, 32))
    import pandas

    parquet = tmp_path / "p" / "data.parquet"
    parquet.parent.mkdir()
    pandas.DataFrame({"body": [r["text"] for r in rows]}).to_parquet(parquet)
    assert len(build_dataset(str(parquet), tokenizer, 32, text_column="body")) > 0
    json_file = tmp_path / "j" / "data.json"
    json_file.parent.mkdir()
    json_file.write_text(json.dumps(rows))
    assert len(build_dataset(str(json_file), tokenizer, 32)) > 0


def test_chat_labels_only_on_assistant_tokens(tokenizer, tmp_path):
    record = {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green."},
    ]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(record))
    item = build_dataset(str(path), tokenizer, 512)[0]
    labelled = [token for token, label in zip(item["input_ids"], item["labels"]) if label != IGNORE_INDEX]
    text = tokenizer.decode(labelled)
    assert "Blue." in text
    assert "Green." in text
    assert "colour" not in text
    assert "terse" not in text
    assert "Another" not in text


def test_prompt_response_records(tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "What is two plus two?", "response": "Four."}))
    item = build_dataset(str(path), tokenizer, 512)[0]
    labelled = tokenizer.decode([t for t, l in zip(item["input_ids"], item["labels"]) if l != IGNORE_INDEX])
    assert "Four." in labelled
    assert "plus" not in labelled


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("empty.txt", "", "is empty"),
        ("columns.jsonl", json.dumps({"body": "x"}), "expected 'text'"),
        ("short.txt", "Too short.", "fewer than one sequence of --model_max_length=64"),
        ("notes.csv", "a,b", "unsupported data file"),
    ],
)
def test_bad_data_errors(tokenizer, tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=fragment):
        build_dataset(str(path), tokenizer, 64)


def test_missing_dataset_and_mixed_folder(tokenizer, tmp_path):
    with pytest.raises(DataError, match="neither a local file or folder nor a dataset in the local datasets cache"):
        build_dataset(str(tmp_path / "nothing-here"), tokenizer, 64)
    (tmp_path / "a.txt").write_text("x " * 100)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "y"}))
    with pytest.raises(DataError, match="mixes file types"):
        build_dataset(str(tmp_path), tokenizer, 8)


def test_chat_without_assistant_in_window(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hello " * 300}, {"role": "assistant", "content": "hi"}]}))
    with pytest.raises(DataError, match="no record has an assistant token"):
        build_dataset(str(path), tokenizer, 32)


def test_collator_pads_right_with_ignored_labels():
    batch = PaddingCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [-100]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def _cache_dataset(cache: Path, repo: str, config_name: str, records: list[dict], tmp_path) -> None:
    """Write what an online `load_dataset(repo, config_name)` leaves in the datasets cache:
    <cache>/<namespace>___<name>/<config>/0.0.0/<commit>/{dataset_info.json, <name>-train.arrow}."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json, JsonConfig

    namespace, name = repo.split("/")
    source = tmp_path / f"{name}-{config_name}.jsonl"
    source.write_text("\n".join(json.dumps(record) for record in records), encoding="utf-8")

    class RepoBuilder(Json):
        BUILDER_CONFIGS = [JsonConfig(name=config_name, data_files=DataFilesDict.from_patterns({"train": [str(source)]}))]

    # The builder names its folder and arrow files after dataset_name; an online run adds the namespace
    # to the folder name only.
    RepoBuilder(cache_dir=str(cache), dataset_name=name, config_name=config_name, hash="0" * 40).download_and_prepare()
    (cache / f"{namespace}___{name}").mkdir(exist_ok=True)
    (cache / name / config_name).rename(cache / f"{namespace}___{name}" / config_name)


def test_dataset_name_from_local_cache(tokenizer, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    cache = tmp_path / "datasets-cache"
    prose = [{"text": "The river ran past the mill and the old stone bridge. " * 30} for _ in range(4)]
    chat = [{"messages": [{"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The Volga."}]}] * 3
    _cache_dataset(cache, "acme/tiny-corpus", "default", prose, tmp_path)
    _cache_dataset(cache, "acme/tiny-corpus", "chat", chat, tmp_path)
    # The hub is unreachable here: offline mode sends load_dataset straight to the cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    text = build_dataset("acme/tiny-corpus", tokenizer, 64, config_name="default")
    assert text.kind == "text"
    assert len(text) >= 4
    assert len(text[0]["input_ids"]) == 64
    dialogue = build_dataset("acme/tiny-corpus", tokenizer, 64, config_name="chat")
    assert dialogue.kind == "chat"
    assert len(dialogue) == 3
    with pytest.raises(DataError, match="not-cached"):
        build_dataset("acme/not-cached", tokenizer, 64)
