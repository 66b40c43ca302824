import json
import os
import stat

import pytest
import torch
from tiny_models import random_ids, tiny_model

import dsa
from dsa.integrations.hf.serialization import ADAPTER_CONFIG_NAME, WEIGHTS_NAME

CONFIG = dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=5)


def _trained(seed=0):
    model = dsa.convert(tiny_model(), CONFIG)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in dsa.indexer_parameters(model):
            p.normal_()
    return model


def test_adapter_round_trip_gives_identical_logits(tmp_path):
    model = _trained()
    ids = random_ids(2, 24)
    with torch.no_grad():
        expected = model(ids).logits
    dsa.save_indexer(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [ADAPTER_CONFIG_NAME, WEIGHTS_NAME]
    fresh = dsa.load_indexer(tiny_model(), tmp_path / "adapter")
    assert fresh.dsa_runtime.config == model.dsa_runtime.config
    assert fresh.dsa_runtime.indexer_trained
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


def test_adapter_into_converted_model(tmp_path):
    model = _trained()
    dsa.save_indexer(model, tmp_path)
    target = dsa.convert(tiny_model(), CONFIG)
    dsa.load_indexer(target, tmp_path)
    for a, b in zip(dsa.indexer_parameters(model), dsa.indexer_parameters(target)):
        assert torch.equal(a, b)
    other_shape = dsa.convert(tiny_model(), dsa.DSAConfig(indexer_heads=3, indexer_head_dim=16, rope_dim=8, top_k=5))
    with pytest.raises(ValueError, match=r"different indexer shape \(\['indexer_heads'\]\)"):
        dsa.load_indexer(other_shape, tmp_path)


def test_adapter_for_other_base_rejected(tmp_path):
    dsa.save_indexer(_trained(), tmp_path)
    with pytest.raises(ValueError, match="different base model .*num_hidden_layers: adapter 2, model 3"):
        dsa.load_indexer(tiny_model(num_hidden_layers=3), tmp_path)
    with pytest.raises(ValueError, match="model_type: adapter 'llama', model 'qwen2'"):
        dsa.load_indexer(tiny_model("qwen2"), tmp_path)


def test_missing_and_corrupt_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / ADAPTER_CONFIG_NAME}"):
        dsa.load_indexer(tiny_model(), tmp_path)
    dsa.save_indexer(_trained(), tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=f"{tmp_path / WEIGHTS_NAME} are corrupt"):
        dsa.load_indexer(tiny_model(), tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / WEIGHTS_NAME}"):
        dsa.load_indexer(tiny_model(), tmp_path)
    (tmp_path / ADAPTER_CONFIG_NAME).write_text("{broken")
    with pytest.raises(ValueError, match=f"{tmp_path / ADAPTER_CONFIG_NAME} is not valid JSON"):
        dsa.load_indexer(tiny_model(), tmp_path)


def test_save_never_overwrites_silently(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    model = _trained()
    dsa.save_indexer(model, tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        dsa.save_indexer(_trained(seed=1), tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    dsa.save_indexer(_trained(seed=1), tmp_path, overwrite=True)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() != before
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_save_requires_converted_model(tmp_path):
    with pytest.raises(ValueError, match="call dsa.convert"):
        dsa.save_indexer(tiny_model(), tmp_path)


def test_adapter_config_records_base_signature(tmp_path):
    dsa.save_indexer(_trained(), tmp_path)
    adapter = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert adapter["base_model"] == {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "converted_layers": [0, 1]}
    assert adapter["dsa_config"]["top_k"] == 5


def test_save_pretrained_round_trip(tmp_path):
    model = _trained()
    ids = random_ids(2, 24)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "full")
    loaded = dsa.from_pretrained(tmp_path / "full")
    assert dsa.is_converted(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_from_pretrained_of_plain_checkpoint_rejected(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no 'dsa_config' entry"):
        dsa.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        dsa.from_pretrained(tmp_path / "missing")


def test_adapter_saved_in_bfloat16_loads_into_fp32_model(tmp_path):
    model = _trained()
    dsa.save_indexer(model, tmp_path, dtype=torch.bfloat16)
    fresh = dsa.load_indexer(tiny_model(), tmp_path)
    for saved, loaded in zip(dsa.indexer_parameters(model), dsa.indexer_parameters(fresh)):
        assert loaded.dtype == torch.float32
        assert torch.equal(loaded, saved.to(torch.bfloat16).float())


def test_saved_files_follow_umask(tmp_path):
    # Temporary files are created owner-only; the renamed adapter must get the usual 0644 under umask 022.
    model = tiny_model("llama")
    dsa.convert(model, dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=16), indexer_trained=True)
    previous = os.umask(0o022)
    try:
        folder = dsa.save_indexer(model, tmp_path / "adapter")
    finally:
        os.umask(previous)
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
