import dataclasses

import pytest
import torch
from tiny_models import SMALL_DSA, random_ids, tiny_model

import dsa
from dsa import DSAConfig


def _converted(dense_layers):
    model = tiny_model("llama")
    dsa.convert(model, dataclasses.replace(SMALL_DSA, dense_layers=dense_layers), indexer_trained=True)
    return model


@pytest.mark.parametrize(("value", "message"), [([-1], "dense_layers"), ([0, 0], "distinct"), ("0", "dense_layers")])
def test_bad_dense_layers_are_rejected(value, message):
    with pytest.raises(ValueError, match=message):
        DSAConfig(dense_layers=value)


def test_dense_layers_survive_json():
    config = DSAConfig(dense_layers=[3, 0])
    assert config.dense_layers == [0, 3]
    assert DSAConfig.from_json_string(config.to_json_string()) == config


def test_unknown_layer_is_rejected_at_convert():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"names layers \[7\] that have no DSA indexer"):
        dsa.convert(model, dataclasses.replace(SMALL_DSA, dense_layers=[7]), indexer_trained=True)


def test_dense_layer_selects_nothing():
    model = _converted([0])
    with torch.no_grad():
        model(random_ids(1, 40))
    assert sorted(dsa.keys_per_query(model)) == [1]


def test_all_layers_dense_equal_unconverted_model():
    reference = tiny_model("llama")
    model = _converted([])
    ids = random_ids(1, 40)  # longer than top_k 16, so sparse layers would change the logits
    with torch.no_grad():
        sparse_logits = model(ids).logits
        dsa.update_config(model, dense_layers=[0, 1])
        dense_logits = model(ids).logits
        expected = reference(ids).logits
    torch.testing.assert_close(dense_logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sparse_logits, expected, atol=1e-3)


def test_warmup_loss_skips_dense_layer():
    model = _converted([0])
    dsa.set_mode(model, "warmup")
    output = model(random_ids(1, 40))
    output.indexer_loss.backward()
    layer_0, layer_1 = (layer.self_attn.indexer for layer in model.model.layers)
    assert all(parameter.grad is None for parameter in layer_0.parameters())
    assert all(parameter.grad is not None for parameter in layer_1.parameters())


def test_generation_with_a_dense_layer():
    model = _converted([1])
    ids = random_ids(1, 30)
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert tokens.shape == (1, 35)
    assert sorted(dsa.keys_per_query(model)) == [0]


def test_saved_adapter_keeps_dense_layers(tmp_path):
    model = _converted([0])
    dsa.save_indexer(model, tmp_path / "adapter")
    fresh = tiny_model("llama")
    dsa.load_indexer(fresh, tmp_path / "adapter")
    assert dsa.get_runtime(fresh).config.dense_layers == [0]
