import copy
import dataclasses
import io
import logging

import pytest
import torch
from tiny_models import SMALL_DSA, random_ids, tiny_model
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import Cache, DynamicIndexedLayer, DynamicSlidingWindowLayer, StaticIndexedLayer

import dsa
from dsa.integrations.hf.attention import dsa_attention_forward

TOP_K = 6


def _pair(top_k=TOP_K, model_type="llama"):
    original = tiny_model(model_type)
    model = dsa.convert(copy.deepcopy(original), dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=top_k))
    return original, model


def test_untrained_indexer_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="dsa.integrations.hf.convert"):
        dsa.convert(tiny_model(), SMALL_DSA)
    assert any("random weights" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dsa.integrations.hf.convert"):
        dsa.convert(tiny_model(), SMALL_DSA, indexer_trained=True)
    assert not caplog.records


def test_dense_mode_matches_original():
    original, model = _pair()
    assert model.dsa_runtime.mode == "sparse"
    ids = random_ids(2, 30)
    with torch.no_grad():
        sparse = model(ids).logits
        dsa.set_mode(model, "dense")
        dense = model(ids).logits
        expected = original(ids).logits
    assert torch.equal(dense, expected)
    assert not torch.allclose(sparse, expected, atol=1e-3), "past top_k the sparse path must differ from dense"


def test_greedy_identical_while_fitting_in_top_k():
    original, model = _pair(top_k=40)
    prompt = random_ids(1, 10)
    kwargs = dict(max_new_tokens=25, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), original.generate(prompt, **kwargs))


def test_sampling_identical_while_fitting_in_top_k():
    original, model = _pair(top_k=40)
    prompt = random_ids(1, 10)
    kwargs = dict(max_new_tokens=20, do_sample=True, top_p=0.9, temperature=1.3, pad_token_id=0)
    torch.manual_seed(7)
    sampled = model.generate(prompt, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(sampled, original.generate(prompt, **kwargs))


def test_generation_past_top_k_is_sparse():
    _, model = _pair()
    prompt = random_ids(1, 10)
    out = model.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 40
    counts = dsa.keys_per_query(model)
    # The last decode step attends TOP_K of its 39 visible keys, in every converted layer.
    assert sorted(counts) == [0, 1]
    for layer_counts in counts.values():
        assert layer_counts.shape == (1, 1)
        assert int(layer_counts) == TOP_K


@torch.no_grad()
def _assert_decode_equals_full_prefill(model, ids, cache, prefix=20):
    """Prefill `prefix` tokens into `cache`, decode the rest one token at a time, and assert that every
    step attends as many keys and gives the same logits as one full prefill of `ids`."""
    full = model(ids).logits
    full_counts = dsa.keys_per_query(model)
    step_logits = [model(ids[:, :prefix], cache=cache, use_cache=True).logits]
    for t in range(prefix, ids.shape[1]):
        step_logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        for layer, counts in dsa.keys_per_query(model).items():
            assert torch.equal(counts[:, 0], full_counts[layer][:, t])
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full, atol=1e-5, rtol=1e-5)


def test_decode_after_prefill_equals_full_prefill():
    _, model = _pair()
    ids = random_ids(2, 28)
    cache = DynamicCache(config=model.config)
    _assert_decode_equals_full_prefill(model, ids, cache)
    assert all(isinstance(layer, DynamicIndexedLayer) for layer in cache.layers)
    assert cache.layers[0].indexer_keys.shape[1] == 28


def test_static_cache_decode_equals_full_prefill():
    _, model = _pair()
    ids = random_ids(2, 28)
    with torch.no_grad():
        full = model(ids).logits
        cache = StaticCache(config=model.config, max_cache_len=40)
        step_logits = [model(ids[:, :20], cache=cache, use_cache=True).logits]
        for t in range(20, 28):
            step_logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
            # The unfilled tail of the 40-slot buffers is never selected: exactly top_k keys per query.
            assert all(int(counts.max()) == TOP_K for counts in dsa.keys_per_query(model).values())
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full, atol=1e-5, rtol=1e-5)
    assert all(isinstance(layer, StaticIndexedLayer) for layer in cache.layers)
    assert int(cache.layers[0].indexer_cumulative_length) == 28


@pytest.mark.parametrize("cache_type", ["dynamic", "static"])
def test_bf16_score_product_keeps_bf16_key_cache(cache_type):
    # The cache stores bf16 indexer keys. Decode steps read them and select as a full prefill does,
    # because the prefill rounds its fp32 keys to bf16 in the same way.
    _, model = _pair()
    dsa.update_config(model, indexer_score_dtype="bfloat16")
    ids = random_ids(2, 28)
    cache = DynamicCache(config=model.config) if cache_type == "dynamic" else StaticCache(config=model.config, max_cache_len=40)
    _assert_decode_equals_full_prefill(model, ids, cache)
    assert all(layer.indexer_keys.dtype == torch.bfloat16 for layer in cache.layers)
    # Training keeps fp32 keys: with gradients enabled the cache takes the indexer's own dtype.
    grad_cache = DynamicCache(config=model.config)
    model(ids[:, :20], cache=grad_cache, use_cache=True)
    assert all(layer.indexer_keys.dtype == torch.float32 for layer in grad_cache.layers)


@pytest.mark.parametrize("pads", [0, 5])
def test_static_cache_generation_equals_dynamic(pads):
    _, model = _pair()
    batch = torch.cat([random_ids(1, 12, seed=6), random_ids(1, 12, seed=8)])
    mask = torch.ones_like(batch)
    batch[1, :pads] = 0
    mask[1, :pads] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=0)
    dynamic = model.generate(batch, **kwargs)
    static = model.generate(batch, cache_implementation="static", **kwargs)
    assert torch.equal(static, dynamic)
    assert all(int(counts.max()) == TOP_K for counts in dsa.keys_per_query(model).values())


def test_static_cache_overflow_names_max_cache_len():
    _, model = _pair()
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad(), pytest.raises(ValueError, match="max_cache_len=16"):
        model(random_ids(1, 20), cache=cache, use_cache=True)


def test_unsupported_cache_layer_rejected():
    _, model = _pair()
    layers = [DynamicSlidingWindowLayer(sliding_window=8) for _ in range(model.config.num_hidden_layers)]
    with torch.no_grad(), pytest.raises(TypeError, match="DynamicSlidingWindowLayer; use the default cache"):
        model(random_ids(1, 10), cache=Cache(layers=layers), use_cache=True)


def test_selected_sets_equal_between_prefill_and_decode(monkeypatch):
    _, model = _pair()
    ids = random_ids(1, 24, seed=3)
    recorded = []
    select = model.dsa_runtime.backend.select_topk

    def recording(*args, **kwargs):
        indices = select(*args, **kwargs)
        recorded.append(indices)
        return indices

    monkeypatch.setattr(model.dsa_runtime, "backend", dataclasses.replace(model.dsa_runtime.backend, select_topk=recording))
    with torch.no_grad():
        model(ids)
        prefill = [r.clone() for r in recorded]
        recorded.clear()
        cache = DynamicCache(config=model.config)
        model(ids[:, :23], cache=cache, use_cache=True)
        recorded.clear()
        model(ids[:, 23:], cache=cache, use_cache=True)
    assert len(prefill) == len(recorded) == len(model.dsa_runtime.layers)
    for layer, (whole, step) in enumerate(zip(prefill, recorded)):
        assert torch.equal(whole[:, -1], step[:, 0]), f"layer {layer} selected a different set in decode"


def test_left_padded_batch_row_equals_row_alone():
    _, model = _pair()
    long_ids, short_ids = random_ids(1, 26, seed=4), random_ids(1, 19, seed=5)
    pad = 26 - 19
    batch = torch.cat([long_ids, torch.cat([torch.zeros(1, pad, dtype=torch.long), short_ids], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    with torch.no_grad():
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        batched = model(batch, attention_mask=mask, position_ids=position_ids).logits
        batched_counts = dsa.keys_per_query(model)
        alone = model(short_ids).logits
        alone_counts = dsa.keys_per_query(model)
    torch.testing.assert_close(batched[1, pad:], alone[0], atol=1e-5, rtol=1e-5)
    for layer in alone_counts:
        assert torch.equal(batched_counts[layer][1, pad:], alone_counts[layer][0])


def test_padding_never_selected(monkeypatch):
    _, model = _pair()
    recorded = []
    select = model.dsa_runtime.backend.select_topk

    def recording(*args, **kwargs):
        indices = select(*args, **kwargs)
        recorded.append(indices)
        return indices

    monkeypatch.setattr(model.dsa_runtime, "backend", dataclasses.replace(model.dsa_runtime.backend, select_topk=recording))
    pad = 9
    batch = torch.cat([random_ids(1, 30, seed=12), torch.cat([torch.zeros(1, pad, dtype=torch.long), random_ids(1, 30 - pad, seed=13)], 1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert recorded[0].shape[1] == 30, "the prefill's selection was not recorded"
    for indices in recorded:
        padded_row = indices[1]
        assert not ((padded_row >= 0) & (padded_row < pad)).any(), "a left-padding key was selected"


def test_batched_generation_with_left_padding_matches_single():
    _, model = _pair()
    prompts = [random_ids(1, 12, seed=6), random_ids(1, 7, seed=8)]
    pad = 5
    batch = torch.cat([prompts[0], torch.cat([torch.zeros(1, pad, dtype=torch.long), prompts[1]], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    kwargs = dict(max_new_tokens=15, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kwargs)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt, **kwargs)
        assert torch.equal(together[row, -15:], alone[0, -15:]), f"row {row} differs when batched"


def test_beam_search_matches_and_runs_sparse():
    original, model = _pair(top_k=40)
    prompt = random_ids(1, 8)
    kwargs = dict(max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0)
    # Below top_k the beams are those of the original model.
    assert torch.equal(model.generate(prompt, **kwargs), original.generate(prompt, **kwargs))
    dsa.update_config(model, top_k=4)
    out = model.generate(prompt, max_new_tokens=20, num_beams=3, num_return_sequences=3, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 28)


def test_continue_from_returned_cache():
    _, model = _pair()
    first = random_ids(1, 10, seed=9)
    out = model.generate(first, max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    second_turn = torch.cat([out.sequences, random_ids(1, 5, seed=10)], dim=1)
    continued = model.generate(second_turn, cache=out.cache, max_new_tokens=8, do_sample=False, pad_token_id=0)
    fresh = model.generate(second_turn, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(continued, fresh)


def test_use_cache_false_matches_cached_generation():
    _, model = _pair()
    prompt = random_ids(1, 10, seed=11)
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, use_cache=False, **kwargs), model.generate(prompt, **kwargs))


def test_cache_crop_and_select_keep_indexer():
    _, model = _pair()
    ids = random_ids(3, 20)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    cache.crop(-5)
    assert cache.layers[0].indexer_keys.shape[1] == 15
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert cache.layers[1].indexer_keys.shape[0] == 2
    with torch.no_grad():
        model(ids[[0, 2], 15:16], cache=cache, use_cache=True)
    assert cache.layers[0].indexer_keys.shape[1] == 16


def test_cache_filled_before_convert_rejected():
    original = tiny_model()
    cache = DynamicCache(config=original.config)
    ids = random_ids(1, 10)
    with torch.no_grad():
        original(ids, cache=cache, use_cache=True)
        dsa.convert(original, SMALL_DSA)
        with pytest.raises(ValueError, match="computed without a DSA indexer"):
            original(ids[:, :1], cache=cache, use_cache=True)


def _attention_inputs(queries, keys, seed):
    """Return random hidden [1, T, 64], query [1, 4, T, 16], key and value [1, 2, S, 16] for the tiny
    model's first layer, and the generator for further draws."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, queries, 64, generator=generator)
    query = torch.randn(1, 4, queries, 16, generator=generator)
    key = torch.randn(1, 2, keys, 16, generator=generator)
    value = torch.randn(1, 2, keys, 16, generator=generator)
    return hidden, query, key, value, generator


@pytest.mark.parametrize("form", ["bool4d", "float4d", "none"])
def test_attention_function_honours_every_mask_form(form):
    _, model = _pair(top_k=3)
    module = model.model.layers[0].self_attn
    hidden, query, key, value, _ = _attention_inputs(queries=9, keys=9, seed=0)
    causal = torch.ones(9, 9, dtype=torch.bool).tril().view(1, 1, 9, 9)
    masks = {
        "bool4d": causal,
        "float4d": torch.zeros(1, 1, 9, 9).masked_fill(~causal, torch.finfo(torch.float32).min),
        "none": None,
    }
    outputs = {}
    for name, mask in masks.items():
        module.dsa_state.indexer_inputs = module.indexer(hidden, torch.arange(9).view(1, 9))
        outputs[name], _ = dsa_attention_forward(module, query, key, value, mask, scaling=0.25)
    torch.testing.assert_close(outputs[form], outputs["bool4d"], atol=0, rtol=0)
    # A mask that hides key 0 from every query must change the output of the early rows.
    module.dsa_state.indexer_inputs = module.indexer(hidden, torch.arange(9).view(1, 9))
    hidden_first = causal.clone()
    hidden_first[..., 0] = False
    hidden_first[..., 0, 0] = True
    masked, _ = dsa_attention_forward(module, query, key, value, hidden_first, scaling=0.25)
    assert not torch.allclose(masked[:, 1:4], outputs["bool4d"][:, 1:4])


def test_model_pickles_after_static_decode():
    """A static cache passes a decode mask, which the runtime remembers by weak reference; saving the whole
    model afterwards must still work."""
    _, model = _pair()
    model.generate(random_ids(1, 12), max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert model.dsa_runtime.visible_mask_memo is not None
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert restored.dsa_runtime.visible_mask_memo is None


def test_unpadded_prefill_gets_no_materialised_mask():
    """Without padding, transformers' mask function leaves the causal mask out, which would cost T * S
    bytes. With left padding the attention function receives it."""
    from transformers import AttentionInterface

    from dsa.integrations.hf.attention import ATTENTION_NAME, register

    _, model = _pair()
    masks = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return dsa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ATTENTION_NAME, recording)
    try:
        ids = random_ids(2, 20, seed=3)
        with torch.no_grad():
            model(ids)
            assert masks and all(mask is None for mask in masks), "an unpadded prefill received a mask"
            masks.clear()
            padding = torch.ones_like(ids)
            padding[1, :4] = 0
            model(ids, attention_mask=padding)
    finally:
        register()
    assert masks and all(mask is not None and not bool(mask.all()) for mask in masks)


def test_decode_mask_memo_sees_changed_masks():
    """The attention function checks a decode mask once and reuses the result for the same tensor. A mask
    changed in place, or a new mask that hides keys, must still hide them."""
    _, model = _pair(top_k=3)
    module = model.model.layers[0].self_attn
    hidden, query, key, value, generator = _attention_inputs(queries=1, keys=12, seed=1)
    keys = torch.randn(1, 12, 16, generator=generator)
    weights = torch.randn(1, 1, 2, generator=generator)

    def step(mask):
        q_idx = module.indexer(hidden, torch.tensor([[11]]))[0]
        module.dsa_state.indexer_inputs = (q_idx, keys, weights)
        return dsa_attention_forward(module, query, key, value, mask, scaling=0.25)[0]

    def chosen(mask):
        """Keys the selection keeps for the decode row under `mask`, from the reference operator."""
        q_idx = module.indexer(hidden, torch.tensor([[11]]))[0]
        return dsa.ops.select_topk_reference(q_idx, keys, weights, 3, q_start=11, key_padding_mask=mask.view(1, 12))

    mask = torch.ones(1, 1, 1, 12, dtype=torch.bool)
    everything = step(mask)
    assert model.dsa_runtime.visible_mask_memo is not None, "an all-visible decode mask was not remembered"
    torch.testing.assert_close(step(mask), everything, atol=0, rtol=0)
    # Hide the keys the all-visible step selected, in place: the memo must not hide the change.
    mask[0, 0, 0, chosen(mask)[0, 0]] = False
    in_place = step(mask)
    torch.testing.assert_close(in_place, step(mask.clone()), atol=0, rtol=0)
    assert not torch.allclose(in_place, everything)


def test_stale_indexer_inputs_never_reused():
    _, model = _pair()
    module = model.model.layers[0].self_attn
    query, key = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16)
    with pytest.raises(RuntimeError, match="the DSA indexer did not run before attention"):
        dsa_attention_forward(module, query, key, key, None)


@pytest.mark.parametrize("pads", [[0, 0], [0, 5]], ids=["unpadded", "left-padded"])
def test_fused_prefill_equals_two_operators(monkeypatch, pads):
    """Without gradients, a prefill past top_k selects and attends one block at a time. Its logits and
    keys per query must equal those of the whole selection followed by sparse attention."""
    import dsa.integrations.hf.attention as attention_module

    _, model = _pair()
    model.eval()
    ids = random_ids(2, 40)
    mask = torch.ones(2, 40, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    calls = []
    original_fused = attention_module.sparse_prefill_torch

    def counting_fused(*args, **kwargs):
        calls.append(args[0].shape[1])
        return original_fused(*args, **kwargs)

    monkeypatch.setattr(attention_module, "sparse_prefill_torch", counting_fused)
    with torch.no_grad():
        fused = model(ids, attention_mask=mask).logits
        fused_counts = [state.keys_per_query.clone() for state in model.dsa_runtime.layers]
        assert calls == [40] * len(model.dsa_runtime.layers)
        monkeypatch.setattr(attention_module, "_fused_prefill_applies", lambda *args: False)
        separate = model(ids, attention_mask=mask).logits
        separate_counts = [state.keys_per_query for state in model.dsa_runtime.layers]
    assert torch.allclose(fused, separate, atol=1e-5, rtol=1e-5)
    for fused_layer, separate_layer in zip(fused_counts, separate_counts):
        assert torch.equal(fused_layer, separate_layer)
