import torch
from tiny_models import tiny_model
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import dsa
from dsa.integrations.hf.rope import indexer_rope_table
from dsa.ops.rope import rope_inverse_frequencies


def test_default_table_uses_host_theta():
    model = tiny_model(rope_parameters={"rope_type": "default", "rope_theta": 123456.0})
    inv_freq, scaling = indexer_rope_table(model.config, 8)
    torch.testing.assert_close(inv_freq, rope_inverse_frequencies(8, 123456.0))
    assert scaling == 1.0
    dsa.convert(model, dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=4))
    torch.testing.assert_close(model.model.layers[0].self_attn.indexer.inv_freq, inv_freq)
    assert model.dsa_runtime.config.rope_theta == 123456.0


def test_llama3_scaling_applied_to_indexer_dims():
    parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = tiny_model(rope_parameters=parameters)
    inv_freq, _ = indexer_rope_table(model.config, 8)
    unscaled = rope_inverse_frequencies(8, 500000.0)
    assert inv_freq.shape == (4,)
    assert not torch.allclose(inv_freq, unscaled), "llama3 scaling should lower the low frequencies"
    # Same as transformers' own llama3 table for a head dim of 8.
    reference_config = tiny_model(rope_parameters=parameters, head_dim=8).config
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](reference_config, device=torch.device("cpu"))
    torch.testing.assert_close(inv_freq, expected.float())


def test_yarn_attention_scaling_kept():
    parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}
    inv_freq, scaling = indexer_rope_table(tiny_model(rope_parameters=parameters).config, 8)
    assert inv_freq.shape == (4,)
    assert scaling > 1.0
