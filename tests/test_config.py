import json

import pytest

from dsa import PRESETS, DSAConfig


def test_json_round_trip(tmp_path):
    config = DSAConfig(indexer_heads=8, indexer_head_dim=96, rope_dim=48, rope_layout="interleaved", top_k=512,
                       q_lora_rank=128, sink_tokens=4, local_tokens=16, backend="torch", rope_theta=5e5)
    path = tmp_path / "dsa.json"
    config.to_json_file(path)
    assert DSAConfig.from_json_file(path) == config
    assert DSAConfig.from_json_string(config.to_json_string()) == config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(name):
    config = DSAConfig.preset(name)
    assert config.extra["preset"] == name
    assert DSAConfig.from_dict(json.loads(config.to_json_string())) == config


def test_preset_values():
    smol = DSAConfig.preset("smollm2-135m")
    assert (smol.indexer_heads, smol.indexer_head_dim, smol.rope_dim) == (4, 32, 16)
    deepseek = DSAConfig.preset("deepseek-v3.2")
    assert (deepseek.indexer_heads, deepseek.indexer_head_dim, deepseek.rope_dim, deepseek.top_k) == (64, 128, 64, 2048)
    assert DSAConfig.preset("smollm2-135m", top_k=128).top_k == 128


def test_defaults_are_rotate_half_and_lowest_index():
    config = DSAConfig()
    assert config.rope_layout == "rotate_half"
    assert config.tie_rule == "lowest_index"
    assert config.q_lora_rank is None
    assert config.sink_tokens == config.local_tokens == 0


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("rope_dim", 31, "even"),
        ("rope_dim", 96, "at most indexer_head_dim=64"),
        ("top_k", 0, ">= 1"),
        ("indexer_heads", -2, ">= 1"),
        ("indexer_head_dim", 1.5, ">= 1"),
        ("rope_layout", "neox", "rotate_half"),
        ("q_lora_rank", 0, "None"),
        ("tie_rule", "random", "lowest_index"),
        ("backend", "cuda", "auto"),
        ("query_chunk_size", 0, ">= 1"),
        ("sink_tokens", -1, ">= 0"),
        ("rope_theta", -1.0, "positive"),
    ],
)
def test_invalid_value_names_field(field, value, fragment):
    with pytest.raises(ValueError) as error:
        DSAConfig(**{field: value})
    message = str(error.value)
    assert f"DSAConfig.{field}={value!r}" in message
    assert fragment in message


def test_sink_plus_local_above_top_k_rejected():
    with pytest.raises(ValueError, match="top_k=8"):
        DSAConfig(top_k=8, sink_tokens=4, local_tokens=5)


def test_unknown_json_field_rejected():
    with pytest.raises(ValueError, match="unknown fields \\['topk'\\]"):
        DSAConfig.from_dict({"topk": 5})


def test_missing_and_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        DSAConfig.from_json_file(tmp_path / "nothere.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        DSAConfig.from_json_file(bad)


def test_unknown_preset():
    with pytest.raises(ValueError, match="available presets"):
        DSAConfig.preset("llama-70b")
