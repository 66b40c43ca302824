import os
import sys
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before any dsa module that
# defines kernels is imported: without a GPU, the Triton kernel tests run in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import dsa

# Let test modules import the shared helpers as `helpers`.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tokenizer_path():
    try:
        return dsa.default_model_path()
    except ModuleNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_path):
    """A 2-layer Llama with the SmolLM2 tokenizer; q and k weights scaled up so attention is peaked
    and an indexer has something to learn."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
        vocab_size=len(tokenizer), max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    source = Path(__file__).resolve().parents[2] / "shared" / "data" / "war_and_peace.txt"
    text = source.read_text(encoding="utf-8")[:60000] if source.is_file() else ("It was a bright cold day in April. " * 2000)
    path = tmp_path_factory.mktemp("data") / "book.txt"
    path.write_text(text, encoding="utf-8")
    return path
