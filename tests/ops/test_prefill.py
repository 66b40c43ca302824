import pytest
import torch
from helpers import assert_close

import dsa.ops.prefill.torch as prefill_module
from dsa.ops.prefill import sparse_prefill_reference, sparse_prefill_torch
from dsa.ops.sparse_attention import sparse_attention_torch
from dsa.ops.topk import select_topk_torch


def _inputs(batch, queries, keys, heads=6, kv_heads=2, head_dim=16, indexer_heads=3, indexer_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return dict(
        q=randn(batch, queries, heads, head_dim), k=randn(batch, keys, kv_heads, head_dim), v=randn(batch, keys, kv_heads, head_dim),
        q_idx=randn(batch, queries, indexer_heads, indexer_dim), k_idx=randn(batch, keys, indexer_dim),
        weights=randn(batch, queries, indexer_heads),
    )


def _padding(batch, keys, pads):
    mask = torch.ones(batch, keys, dtype=torch.bool)
    for row, pad in enumerate(pads):
        mask[row, :pad] = False
    return mask


CASES = {
    "causal": dict(queries=150, keys=150, args={}),
    "after-cache": dict(queries=40, keys=170, args={}),
    "padding": dict(queries=90, keys=90, args={"key_padding_mask": _padding(2, 90, [0, 7])}),
    "sink-local": dict(queries=90, keys=90, args={"sink_tokens": 2, "local_tokens": 4}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_matches_reference(case):
    spec = CASES[case]
    inputs = _inputs(2, spec["queries"], spec["keys"], seed=len(case))
    with torch.no_grad():
        expected_out, expected_counts = sparse_prefill_reference(**inputs, top_k=24, **spec["args"])
        out, counts = sparse_prefill_torch(**inputs, top_k=24, chunk_size=32, **spec["args"])
    assert_close("out", out, expected_out, atol=2e-6, rtol=2e-6)
    assert torch.equal(counts, expected_counts)


def test_prefill_bf16_product_matches_reference():
    inputs = _inputs(2, 150, 150, indexer_heads=4, indexer_dim=32, seed=11)
    with torch.no_grad():
        expected_out, expected_counts = sparse_prefill_reference(**inputs, top_k=24, score_dtype=torch.bfloat16)
        out, counts = sparse_prefill_torch(**inputs, top_k=24, chunk_size=32, score_dtype=torch.bfloat16)
        fp32_out, _ = sparse_prefill_torch(**inputs, top_k=24, chunk_size=32)
    assert_close("out", out, expected_out, atol=2e-6, rtol=2e-6)
    assert torch.equal(counts, expected_counts)
    assert not torch.equal(out, fp32_out), "bf16 scores selected exactly the fp32 sets; the test shows nothing"


def test_prefill_attention_mask_rows():
    inputs = _inputs(1, 60, 60, seed=3)
    rows = torch.ones(1, 60, 60, dtype=torch.bool).tril_()
    rows[0, 30:, 10:20] = False  # later queries may not see keys 10-19
    with torch.no_grad():
        expected_out, expected_counts = sparse_prefill_reference(**inputs, top_k=16, attention_mask=rows)
        out, counts = sparse_prefill_torch(**inputs, top_k=16, attention_mask=rows, chunk_size=16)
    assert_close("out", out, expected_out, atol=2e-6, rtol=2e-6)
    assert torch.equal(counts, expected_counts)


def test_budget_shrinks_score_chunks_without_changing_result(monkeypatch):
    inputs = _inputs(1, 120, 120, seed=5)
    with torch.no_grad():
        whole, _ = sparse_prefill_torch(**inputs, top_k=20, chunk_size=256)
        monkeypatch.setattr(prefill_module, "SCORE_BUDGET", 3 * 120 * 20)
        assert prefill_module._score_chunk(256, 3, 120) == 20
        small, _ = sparse_prefill_torch(**inputs, top_k=20, chunk_size=256)
    assert_close("out", small, whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("score_dtype", [torch.float32, torch.bfloat16])
def test_prefill_equals_two_operators(score_dtype):
    inputs = _inputs(1, 100, 100, seed=9)
    with torch.no_grad():
        indices = select_topk_torch(inputs["q_idx"], inputs["k_idx"], inputs["weights"], 32, score_dtype=score_dtype)
        expected = sparse_attention_torch(inputs["q"], inputs["k"], inputs["v"], indices)
        out, counts = sparse_prefill_torch(**inputs, top_k=32, score_dtype=score_dtype)
    assert_close("out", out, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(counts, (indices >= 0).sum(dim=-1))


def test_prefill_rejects_gradients():
    inputs = _inputs(1, 10, 10)
    inputs["q"].requires_grad_()
    with pytest.raises(ValueError, match="no backward pass"):
        sparse_prefill_torch(**inputs, top_k=4)


def test_prefill_rejects_mismatched_indexer_inputs():
    inputs = _inputs(1, 10, 10)
    inputs["k_idx"] = inputs["k_idx"][:, :9]
    with pytest.raises(ValueError, match="do not match"):
        sparse_prefill_torch(**inputs, top_k=4)


def test_union_path_blocks_of_one_tile(monkeypatch):
    """Without the CPU attention kernel (head dim 16), CPU blocks hold one tile of CPU_UNION_BLOCK queries,
    whatever chunk_size, so that the selection's scores, index sets and SDPA output stay one tile's."""
    calls = []
    original = prefill_module._union_forward
    dtypes = []
    monkeypatch.setattr(
        prefill_module, "_union_forward",
        lambda q, k, v, indices, *a, **kw: calls.append(q.shape[1]) or dtypes.append(indices.dtype) or original(q, k, v, indices, *a, **kw),
    )
    inputs = _inputs(1, 150, 150, seed=3)
    with torch.no_grad():
        out, counts = sparse_prefill_torch(**inputs, top_k=24, chunk_size=256)
        expected_out, expected_counts = sparse_prefill_reference(**inputs, top_k=24)
    assert prefill_module.CPU_UNION_BLOCK == 32
    assert calls == [32, 32, 32, 32, 22]
    assert dtypes == [torch.int32] * 5  # the prefill's index buffer
    assert_close("out", out, expected_out, atol=2e-6, rtol=2e-6)
    assert torch.equal(counts, expected_counts)
