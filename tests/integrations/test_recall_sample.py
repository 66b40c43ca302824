"""Recall measured on a sample of query rows (training logs) against the references over the same rows."""

import pytest
import torch
from tiny_models import random_ids, tiny_model

import dsa
from dsa.integrations.hf.attention import RECALL_BLOCKS, _measure_recall, _recall_blocks
from dsa.integrations.hf.state import LayerState
from dsa.ops.attention_mass.naive import attention_recall_reference
from dsa.ops.topk.naive import select_topk_reference


def test_recall_blocks_span_first_to_last_query():
    blocks = _recall_blocks(8192, 512)
    assert len(blocks) == RECALL_BLOCKS
    assert all(stop - start == 512 // RECALL_BLOCKS for start, stop in blocks)
    assert blocks[0][0] == 0
    assert blocks[-1][1] == 8192
    starts = [start for start, _ in blocks]
    assert starts == sorted(starts)
    assert len(set(starts)) == RECALL_BLOCKS
    assert _recall_blocks(8192, 0) == [(0, 8192)]
    assert _recall_blocks(300, 512) == [(0, 300)]
    # Fewer rows than blocks: one row per block.
    assert all(stop - start == 1 for start, stop in _recall_blocks(100, 4))


def _inputs(seed: int, queries: int = 40, keys: int = 40):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, queries, 4, 16, generator=generator)
    k = torch.randn(1, keys, 2, 16, generator=generator)
    q_idx = torch.randn(1, queries, 2, 16, generator=generator)
    k_idx = torch.randn(1, keys, 16, generator=generator)
    weights = torch.randn(1, queries, 2, generator=generator)
    return q, k, q_idx, k_idx, weights


@pytest.mark.parametrize("from_indices", [False, True])
def test_sampled_recall_equals_reference_over_the_blocks(from_indices):
    """With recall_rows 16 at T 40, the measurement averages 8 blocks of 2 rows, each selected and
    measured as the references do for those rows alone (a block attends the keys up to its last query)."""
    top_k = 8
    model = dsa.convert(tiny_model(), dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=top_k))
    runtime = dsa.get_runtime(model)
    runtime.recall_rows = 16
    state = LayerState(runtime=runtime, layer_idx=0)
    q, k, q_idx, k_idx, weights = _inputs(seed=1)
    scale = 0.25
    mask_args = dict(q_start=0, key_padding_mask=None, attention_mask=None)
    if from_indices:
        indices = select_topk_reference(q_idx, k_idx, weights, top_k)
        _measure_recall(state, q, k, scale, mask_args, indices=indices)
    else:
        _measure_recall(state, q, k, scale, mask_args, indexer_inputs=(q_idx, k_idx, weights))

    expected = []
    for start, stop in _recall_blocks(40, 16):
        chosen = select_topk_reference(q_idx[:, start:stop], k_idx[:, :stop], weights[:, start:stop], top_k, q_start=start)
        expected.append(attention_recall_reference(q[:, start:stop], k[:, :stop], chosen, scale, q_start=start))
    torch.testing.assert_close(state.recall, torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)
    # The first blocks see fewer keys than top_k, so they cover all of their mass; later blocks do not.
    assert float(expected[0]) == pytest.approx(1.0)
    assert float(state.recall) < 1.0


def test_every_row_without_sample():
    top_k = 8
    model = dsa.convert(tiny_model(), dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=top_k))
    state = LayerState(runtime=dsa.get_runtime(model), layer_idx=0)
    q, k, q_idx, k_idx, weights = _inputs(seed=2)
    _measure_recall(state, q, k, 0.25, dict(q_start=0, key_padding_mask=None, attention_mask=None),
                    indexer_inputs=(q_idx, k_idx, weights))
    expected = attention_recall_reference(q, k, select_topk_reference(q_idx, k_idx, weights, top_k), 0.25)
    torch.testing.assert_close(state.recall, expected, rtol=1e-5, atol=1e-6)


def test_warmup_forward_logs_sampled_recall_per_layer():
    """A warm-up forward with recall_rows set stores one recall per sparse layer, between 0 and 1."""
    model = dsa.convert(tiny_model(), dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=8))
    dsa.set_mode(model, "warmup")
    runtime = dsa.get_runtime(model)
    runtime.measure_recall, runtime.recall_rows = True, 16
    with torch.no_grad():
        model(random_ids(2, 48))
    recalls = [state.recall for state in runtime.layers]
    assert recalls and all(recall is not None and 0.0 < float(recall) <= 1.0 for recall in recalls)
