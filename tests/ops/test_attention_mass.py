import pytest
import torch
from helpers import assert_close

from dsa.ops.attention_mass import (
    attention_recall_blockwise,
    attention_recall_reference,
    oracle_topk_blockwise,
    oracle_topk_reference,
)
from dsa.ops.topk import select_topk_torch


def _inputs(queries=29, keys=29, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, queries, 6, 16, generator=generator)
    k = torch.randn(2, keys, 2, 16, generator=generator)
    q_idx, k_idx, w = torch.randn(2, queries, 2, 8, generator=generator), torch.randn(2, keys, 8, generator=generator), torch.randn(2, queries, 2, generator=generator)
    mask = torch.ones(2, keys, dtype=torch.bool)
    mask[1, :4] = False
    return q, k, select_topk_torch(q_idx, k_idx, w, 5, key_padding_mask=mask), mask


@pytest.mark.parametrize("top_k", [1, 5, 64])
def test_oracle_blockwise_equals_reference(top_k):
    q, k, _, mask = _inputs()
    expected = oracle_topk_reference(q, k, top_k, key_padding_mask=mask)
    actual = oracle_topk_blockwise(q, k, top_k, key_padding_mask=mask, chunk_elements=600)
    assert torch.equal(actual, expected)


def test_recall_blockwise_equals_reference():
    q, k, indices, mask = _inputs(seed=1)
    expected = attention_recall_reference(q, k, indices, key_padding_mask=mask)
    actual = attention_recall_blockwise(q, k, indices, key_padding_mask=mask, chunk_elements=600)
    assert_close("recall", actual, expected, atol=1e-6)
    assert 0 < actual < 1


def test_oracle_recall_bounds_indexer_recall():
    q, k, indices, mask = _inputs(seed=2)
    oracle = oracle_topk_blockwise(q, k, indices.shape[-1], key_padding_mask=mask)
    assert attention_recall_blockwise(q, k, oracle, key_padding_mask=mask) >= attention_recall_blockwise(q, k, indices, key_padding_mask=mask)


def test_recall_is_one_when_all_keys_selected():
    q, k, _, mask = _inputs(seed=3)
    everything = oracle_topk_blockwise(q, k, 64, key_padding_mask=mask)
    assert attention_recall_blockwise(q, k, everything, key_padding_mask=mask).item() == pytest.approx(1.0, abs=1e-5)
