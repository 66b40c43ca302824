import copy
import types

import pytest
import torch
from tiny_models import FAMILY_OVERRIDES, SMALL_DSA, random_ids, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

import dsa
from dsa.integrations.hf.support import TESTED_MODEL_TYPES


def test_tested_list_matches_test_grid():
    assert sorted(FAMILY_OVERRIDES) == sorted(TESTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", sorted(FAMILY_OVERRIDES))
def test_family_converts_and_matches_below_top_k(model_type):
    model = tiny_model(model_type)
    original = copy.deepcopy(model)
    ids = random_ids(2, 14)
    dsa.convert(model, SMALL_DSA)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits), "sparse mode below top_k must equal the original"
        greedy = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
        expected = original.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy, expected)


@pytest.mark.parametrize("model_type", sorted(FAMILY_OVERRIDES))
def test_family_sparse_path_matches_dense_mask_oracle(model_type):
    # Past top_k the chunked sparse path must equal the dense-mask oracle on the same selections.
    model = tiny_model(model_type)
    dsa.convert(model, dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=5, backend="torch"))
    ids = random_ids(2, 24, seed=1)
    with torch.no_grad():
        fast = model(ids).logits
        counts = dsa.keys_per_query(model)
        dsa.update_config(model, backend="reference")
        oracle = model(ids).logits
    assert all(int(c.max()) == 5 for c in counts.values())
    torch.testing.assert_close(fast, oracle, atol=2e-5, rtol=1e-5)


def test_gemma3_sliding_layers_stay_dense():
    model = tiny_model("gemma3_text")
    dsa.convert(model, SMALL_DSA)
    converted = [state.layer_idx for state in model.dsa_runtime.layers]
    assert converted == [1]
    assert not hasattr(model.model.layers[0].self_attn, "indexer")


def _reject(model, fragment):
    with pytest.raises(dsa.UnsupportedModelError, match=fragment):
        dsa.convert(model)


def test_softcapping_rejected():
    config = AutoConfig.for_model("gemma2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  num_hidden_layers=2, intermediate_size=128, vocab_size=128, head_dim=16)
    _reject(AutoModelForCausalLM.from_config(config), "'gemma2': its attention applies logit soft-capping")


def test_all_sliding_mistral_rejected():
    _reject(tiny_model("mistral", sliding_window=4), "'mistral': every attention layer uses a sliding window")


def test_encoder_decoder_rejected():
    from transformers import BartConfig, BartForCausalLM

    config = BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, vocab_size=64, is_encoder_decoder=True)
    _reject(BartForCausalLM(config), "'bart': it is an encoder-decoder model")


def test_attention_sinks_rejected():
    config = AutoConfig.for_model("gpt_oss", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  num_hidden_layers=2, intermediate_size=64, vocab_size=128, head_dim=16,
                                  num_local_experts=2)
    _reject(AutoModelForCausalLM.from_config(config), "'gpt_oss': its attention adds learned attention sinks")


def test_remote_code_rejected():
    model = tiny_model("llama")
    remote_class = types.new_class("ChatGLMForConditionalGeneration", (type(model),))
    remote_class.__module__ = "transformers_modules.chatglm.modeling_chatglm"
    model.__class__ = remote_class
    model.config.model_type = "custom_glm"
    _reject(model, "'custom_glm': its modeling code .* is not part of transformers")
    model.config.model_type = "chatglm"
    _reject(model, "'chatglm': its remote modeling code bypasses transformers' AttentionInterface")


def test_untested_type_needs_opt_in():
    config = AutoConfig.for_model("cohere", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  num_hidden_layers=2, intermediate_size=128, vocab_size=128, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    _reject(model, "'cohere': it is not among the tested model types")
    dsa.convert(model, SMALL_DSA, allow_untested=True)
    assert dsa.is_converted(model)
