"""The C++ CPU kernels (dsa/ops/_cpu.cpp) against the PyTorch paths and the references.

The kernels build on first use. A machine without a C++ compiler fails these tests rather than skipping
them, so that CI notices a broken build. DSA_CPU_KERNELS=0 in the environment skips them.
"""

import logging
import math

import pytest
import torch

import dsa.ops._cpu as cpu_module
import dsa.ops.prefill.torch as prefill_module
import dsa.ops.sparse_attention.torch as attention_module
from dsa.ops._cpu import cpu_kernels, cpu_kernels_enabled
from dsa.ops.indexer import index_scores_reference
from dsa.ops.indexer.cpu import index_scores_chunk_cpu
from dsa.ops.indexer.torch import index_scores_chunk, index_scores_chunk_torch, kernel_layout
from dsa.ops.prefill import sparse_prefill_torch
from dsa.ops.sparse_attention import sparse_attention_reference, sparse_attention_torch
from dsa.ops.sparse_attention.cpu import sparse_attention_cpu, sparse_attention_cpu_applies
from dsa.ops.topk import select_topk_reference, select_topk_torch
import dsa.ops.topk.torch as topk_module
from dsa.ops.topk.cpu import select_chunk_cpu, select_few_cpu, select_few_cpu_applies, select_rows_cpu
from dsa.ops.topk.torch import SAMPLE_STRIDE, _ascending_indices, _choose

pytestmark = pytest.mark.skipif(not cpu_kernels_enabled(), reason="DSA_CPU_KERNELS=0 turns the CPU kernels off")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_kernels() is not None, "the CPU kernels did not build; see the warning logged by dsa.ops._cpu"


def _indexer_inputs(batch, queries, keys, heads, head_dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, heads, head_dim, generator=generator)
    k = torch.randn(batch, keys, head_dim, generator=generator)
    w = torch.randn(batch, queries, heads, generator=generator)
    return q, k, w


# Query counts around the kernel's block of 3 queries, key counts around its blocks of 32 and 128 keys,
# head counts around its groups of 4 heads.
@pytest.mark.parametrize(
    ("batch", "queries", "keys", "heads", "head_dim"),
    [(1, 16, 4096, 4, 32), (2, 17, 300, 3, 32), (1, 20, 129, 5, 16), (2, 64, 31, 4, 32), (1, 24, 1000, 20, 128)],
)
def test_index_scores_kernel_matches_torch_and_reference(batch, queries, keys, heads, head_dim):
    q, k, w = _indexer_inputs(batch, queries, keys, heads, head_dim, seed=queries + keys)
    k_t = k.transpose(1, 2).contiguous()
    actual = index_scores_chunk_cpu(q, k_t, w)
    torch.testing.assert_close(actual, index_scores_chunk_torch(q, k.transpose(1, 2), w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual, index_scores_reference(q, k, w), rtol=1e-5, atol=1e-5)


def test_index_scores_kernel_bf16_product():
    """bf16 keys: q rounded to bf16, fp32 sums, logits rounded to bf16. Only the fp32 summation order
    differs from the PyTorch path (a logit can land one bf16 step away), and the selection is the
    reference's."""
    q, k, w = _indexer_inputs(1, 50, 3000, 4, 32, seed=11)
    k_t = k.bfloat16().transpose(1, 2).contiguous()
    actual = index_scores_chunk_cpu(q, k_t, w)
    expected = index_scores_reference(q, k, w, score_dtype=torch.bfloat16)
    torch.testing.assert_close(actual, expected, rtol=2**-7, atol=1e-4)
    assert (actual == index_scores_chunk_torch(q.bfloat16(), k.bfloat16().transpose(1, 2), w)).float().mean() > 0.5
    with torch.no_grad():
        selected = select_topk_torch(q, k, w, 64, score_dtype=torch.bfloat16)
    assert torch.equal(selected, select_topk_reference(q, k, w, 64, score_dtype=torch.bfloat16))


def test_index_scores_kernel_key_prefix():
    """A chunk's keys are the first S' columns of [B, DI, S]: rows S apart, not S' apart."""
    q, k, w = _indexer_inputs(2, 20, 500, 4, 32, seed=3)
    k_t = k.transpose(1, 2).contiguous()
    prefix = k_t[:, :, :333]
    assert not prefix.is_contiguous()
    torch.testing.assert_close(index_scores_chunk_cpu(q, prefix, w), index_scores_reference(q, k[:, :333], w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_index_scores_kernel_reads_the_cache_layout(dtype):
    """Keys-major keys (the transposed view of [B, S, DI], a prefix of it, a batch of two) give the same
    scores as the same keys with unit stride along S."""
    q, k, w = _indexer_inputs(2, 20, 700, 4, 32, seed=5)
    k = k.to(dtype)
    q = q.to(dtype).float()
    for keys in (700, 333, 1):
        view = k[:, :keys].transpose(1, 2)
        assert view.stride(-2) == 1 or keys == 1
        torch.testing.assert_close(
            index_scores_chunk_cpu(q, view, w), index_scores_chunk_cpu(q, view.contiguous(), w), rtol=0, atol=0
        )


def test_index_scores_chunk_kernel_choice(monkeypatch):
    calls = []
    monkeypatch.setattr("dsa.ops.indexer.torch.index_scores_chunk_cpu", lambda *a: calls.append(1) or index_scores_chunk_cpu(*a))
    q, k, w = _indexer_inputs(1, 32, 200, 4, 32)
    cache_view = k.transpose(1, 2)
    assert kernel_layout(cache_view, 32, 4) is cache_view, "the cache's own layout was copied"
    strided = k.repeat(1, 1, 2)[:, :, ::2].transpose(1, 2)  # unit stride along neither S nor DI
    assert kernel_layout(strided, 32, 4).stride(-1) == 1
    index_scores_chunk(q, cache_view, w)
    assert len(calls) == 1
    index_scores_chunk(q[:, :1], cache_view, w[:, :1])  # a decode step: 4 rows, the keys-major product
    index_scores_chunk(q, strided, w)  # strides the kernel does not read
    index_scores_chunk(q.bfloat16(), cache_view.bfloat16(), w)  # a bf16 score product
    assert len(calls) == 2
    q.requires_grad_(True)
    index_scores_chunk(q, cache_view, w)  # the kernel has no backward
    assert len(calls) == 2


@pytest.mark.parametrize("top_k", [16, 100])
def test_selection_with_the_kernel_equals_reference(top_k):
    q, k, w = _indexer_inputs(2, 70, 300, 4, 32, seed=top_k)
    with torch.no_grad():
        actual = select_topk_torch(q, k, w, top_k, chunk_size=32)
    assert torch.equal(actual, select_topk_reference(q, k, w, top_k))


def _chunk_expected(q, k_t, w, first, count):
    """The rule over the chunk's full kernel scores, the invisible keys (past first + t) at -inf."""
    scores = index_scores_chunk_cpu(q, k_t, w)
    span = scores.shape[-1]
    position = first + torch.arange(q.shape[1]).view(1, -1, 1)
    scores = scores.masked_fill(torch.arange(span).view(1, 1, -1) > position, float("-inf"))
    return _rule(scores, count)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["cache", "contiguous"])
def test_select_chunk_equals_full_scores(dtype, layout):
    """A chunk's selection from candidates equals the rule over its full scores: batch of two, a span that
    ends past the last query, key blocks and samples that end mid-block."""
    count, first, queries = 64, 1000, 21
    q, k, w = _indexer_inputs(2, queries, 1333, 4, 32, seed=8)
    k = k.to(dtype)
    q = q.to(dtype).float()
    k_t = k.transpose(1, 2) if layout == "cache" else k.transpose(1, 2).contiguous()
    actual = select_chunk_cpu(q, k_t, w, first, count)
    assert actual is not None
    assert torch.equal(actual, _chunk_expected(q, k_t, w, first, count))


def test_select_chunk_ties_and_too_few_candidates():
    """Tied scores follow the lowest-index rule; a row whose sample bound admits fewer than count keys
    is scored in full."""
    count, first = 32, 600
    q, k, w = _indexer_inputs(1, 6, 700, 4, 16, seed=4)
    k = torch.randint(-2, 3, k.shape).float()  # few distinct scores: ties at every boundary
    q = torch.randint(-2, 3, q.shape).float()
    w = w.abs()
    ties = select_chunk_cpu(q, k.transpose(1, 2), w, first, count)
    assert torch.equal(ties, _chunk_expected(q, k.transpose(1, 2), w, first, count))
    # Large keys at the sampled positions only: the bound sits among them, and fewer than count keys reach it.
    q, k, w = _indexer_inputs(1, 6, 700, 4, 16, seed=5)
    q, w = q.abs(), w.abs()
    k = k.abs() * 0.01
    k[:, ::SAMPLE_STRIDE] *= 1000
    few = select_chunk_cpu(q, k.transpose(1, 2), w, first, count)
    assert torch.equal(few, _chunk_expected(q, k.transpose(1, 2), w, first, count))


def test_select_chunk_declines_short_rows():
    q, k, w = _indexer_inputs(1, 8, 400, 4, 32)
    # Row 0 may attend first + 1 = 191 keys, fewer than 3 * 64.
    assert select_chunk_cpu(q, k.transpose(1, 2), w, 190, 64) is None
    assert select_chunk_cpu(q, k.transpose(1, 2), w, 191, 64) is not None


def test_selection_takes_select_chunk_for_long_rows(monkeypatch):
    calls = []
    original = topk_module.select_chunk_cpu
    monkeypatch.setattr(topk_module, "select_chunk_cpu", lambda *a, **kw: calls.append(a[3]) or original(*a, **kw))
    q, k, w = _indexer_inputs(2, 120, 120, 4, 32, seed=9)
    with torch.no_grad():
        actual = select_topk_torch(q, k, w, 16, chunk_size=32)
    assert torch.equal(actual, select_topk_reference(q, k, w, 16))
    # Chunks start at 0, 32, 64 and 96. Row 0 of the first one may attend one key, so only that chunk declines.
    assert calls == [0, 32, 64, 96]
    assert topk_module.select_chunk_cpu is not original


def _rule(scores, count):
    """The tie rule over whole rows, from the PyTorch selection's general path."""
    return _ascending_indices(_choose(scores, ~torch.isneginf(scores), None, count), count)


def test_select_rows_kernel_follows_the_tie_rule():
    keys, count = 5000, 64
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(9, keys, generator=generator)
    scores[1] = torch.randint(0, 4, (keys,), generator=generator).float()  # ties at the boundary
    scores[2] = 1.0  # all equal: every key is a candidate, the lowest indices win
    # High scores only at the sampled positions: fewer than count keys reach the sample's bound.
    scores[3] = torch.arange(keys).remainder(SAMPLE_STRIDE).eq(0).float() * 10 + torch.rand(keys, generator=generator)
    scores[4, keys // 3 :] = float("-inf")  # a causal row: invisible keys are -inf
    scores[5, 40:] = float("-inf")  # fewer visible keys than count: all of them, then -1
    scores[6] = float("-inf")  # no visible key: all -1
    scores[7, :100] = 100.0  # more keys above the bound than half the row would allow
    actual = select_rows_cpu(scores.unsqueeze(0), count)
    assert actual.shape == (1, 9, count)
    assert torch.equal(actual, _rule(scores.unsqueeze(0), count))
    assert torch.equal(actual[0, 5, 40:], torch.full((count - 40,), -1))


@pytest.mark.parametrize("keys", [64, 300, 20000])
def test_select_rows_kernel_short_and_long_rows(keys):
    """Rows shorter than SAMPLED_MIN_SPAN * count skip the sample; longer ones take it."""
    scores = torch.randn(2, 7, keys, generator=torch.Generator().manual_seed(keys))
    assert torch.equal(select_rows_cpu(scores, 64), _rule(scores, 64))


@pytest.mark.parametrize(("batch", "queries", "keys", "head_dim"), [(1, 1, 5000, 32), (2, 3, 1500, 64), (1, 2, 900, 16), (2, 1, 700, 128)])
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.bfloat16])
def test_select_few_kernel_equals_reference(batch, queries, keys, head_dim, score_dtype):
    """Decode selection from keys-major indexer keys, fp32 and bf16 products, against the reference."""
    q, k, w = _indexer_inputs(batch, queries, keys, 8 if head_dim == 16 else 4, head_dim, seed=keys)
    q_start = keys - queries
    expected = select_topk_reference(q, k, w, 256, q_start=q_start, score_dtype=score_dtype)
    assert torch.equal(select_few_cpu(q, k.to(score_dtype), w, q_start, 256), expected)


def test_select_few_kernel_ties_and_short_rows():
    """Scores on a few levels tie at the boundary, where the lowest index wins. Rows that see fewer keys
    than count list them all, then -1."""
    q, k, w = _indexer_inputs(1, 4, 3000, 4, 32, seed=3)
    k, q = (k * 2).round() / 2, (q * 2).round() / 2
    for q_start in (2996, 10):
        expected = select_topk_reference(q, k, w, 64, q_start=q_start)
        assert torch.equal(select_few_cpu(q, k, w, q_start, 64), expected)


def test_select_topk_takes_select_few_for_decode(monkeypatch):
    calls = []
    monkeypatch.setattr(topk_module, "select_few_cpu", lambda *a: calls.append(1) or select_few_cpu(*a))
    q, k, w = _indexer_inputs(2, 1, 3000, 4, 32, seed=4)
    visible = torch.ones(2, 3000, dtype=torch.bool)
    with torch.no_grad():
        for mask in (None, visible):
            actual = select_topk_torch(q, k, w, 128, key_padding_mask=mask)
            assert torch.equal(actual, select_topk_reference(q, k, w, 128))
        assert len(calls) == 2
        visible[1, :100] = False  # padding: the PyTorch path applies the mask
        assert torch.equal(select_topk_torch(q, k, w, 128, key_padding_mask=visible),
                           select_topk_reference(q, k, w, 128, key_padding_mask=visible))
        select_topk_torch(q, k, w, 128, sink_tokens=4)  # forced keys: the PyTorch path
        select_topk_torch(q[:, :, :3], k, w[:, :, :3], 128)  # 3 heads: not a multiple of 4
    assert len(calls) == 2
    assert not select_few_cpu_applies(q[..., :24], k[..., :24])  # DI 24 is not compiled


def _attention_inputs(batch, queries, keys, heads, kv_heads, head_dim, slots, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, heads, head_dim, generator=generator)
    # The Hugging Face cache layout: transposed views of [B, HKV, S, D].
    k = torch.randn(batch, kv_heads, keys, head_dim, generator=generator).transpose(1, 2)
    v = torch.randn(batch, kv_heads, keys, head_dim, generator=generator).transpose(1, 2)
    scores = torch.rand(batch, queries, keys, generator=generator)
    indices = scores.topk(slots, dim=-1).indices.sort(dim=-1).values
    return q, k, v, indices


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(9, 3, 64), (32, 8, 128), (4, 4, 64), (8, 1, 128), (4, 2, 64)]
)
def test_sparse_attention_kernel_matches_reference(heads, kv_heads, head_dim, dtype):
    q, k, v, indices = _attention_inputs(2, 21, 300, heads, kv_heads, head_dim, 70, seed=heads)
    indices[0, 3, 40:] = -1  # a partly filled row
    indices[1, 5] = -1  # a row without keys gives 0
    indices[1, 6, :10] = -1  # empty slots first
    actual = sparse_attention_cpu(q, k, v, indices.to(dtype), head_dim**-0.5)
    torch.testing.assert_close(actual, sparse_attention_reference(q, k, v, indices), rtol=1e-5, atol=1e-5)
    assert torch.equal(actual[1, 5], torch.zeros_like(actual[1, 5]))


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 1, 128), (2, 2, 64)])
def test_sparse_attention_kernel_decode_split(heads, kv_heads, head_dim):
    """Decode rows with few kv heads split their keys over the threads and merge the parts. Rows with
    fewer valid keys than parts, or none, must still match the reference."""
    q, k, v, indices = _attention_inputs(2, 1, 3000, heads, kv_heads, head_dim, 2048, seed=heads)
    indices[1, 0, 1:] = -1  # one valid key: every part but one is empty
    expected = sparse_attention_reference(q, k, v, indices)
    with torch.no_grad():
        # Two threads at least, so that the kernel splits (it splits when rows x kv heads < 2 x threads).
        threads = torch.get_num_threads()
        torch.set_num_threads(max(2, threads))
        try:
            actual = sparse_attention_cpu(q[:1], k[:1], v[:1], indices[:1], head_dim**-0.5)
            torch.testing.assert_close(actual, expected[:1], rtol=1e-5, atol=1e-5)
            actual = sparse_attention_cpu(q[1:], k[1:], v[1:], indices[1:], head_dim**-0.5)
            torch.testing.assert_close(actual, expected[1:], rtol=1e-5, atol=1e-5)
            indices[1] = -1
            assert torch.equal(sparse_attention_cpu(q[1:], k[1:], v[1:], indices[1:], 1.0), torch.zeros_like(q[1:]))
        finally:
            torch.set_num_threads(threads)


def test_sparse_attention_kernel_wide_logits():
    """Logits hundreds apart: the kernel's exp must underflow to 0 without NaN, as the reference's does."""
    q, k, v, indices = _attention_inputs(1, 9, 400, 9, 3, 64, 200, seed=5)
    q = q * 40.0
    actual = sparse_attention_cpu(q, k, v, indices, 64**-0.5)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, sparse_attention_reference(q, k, v, indices), rtol=1e-4, atol=1e-4)


def test_sparse_attention_torch_takes_the_kernel_without_autograd(monkeypatch):
    calls = []
    monkeypatch.setattr(attention_module, "sparse_attention_cpu", lambda *a: calls.append(1) or sparse_attention_cpu(*a))
    q, k, v, indices = _attention_inputs(1, 12, 100, 9, 3, 64, 20)
    expected = sparse_attention_reference(q, k, v, indices)
    with torch.no_grad():
        torch.testing.assert_close(sparse_attention_torch(q, k, v, indices), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sparse_attention_torch(q[:, -1:], k, v, indices[:, -1:]), expected[:, -1:], rtol=1e-5, atol=1e-5)
        sparse_attention_torch(q, k, v, indices, return_lse=True)  # the kernel computes no lse
    assert len(calls) == 2
    q.requires_grad_(True)
    sparse_attention_torch(q, k, v, indices).sum().backward()  # the kernel has no backward
    assert len(calls) == 2
    assert not sparse_attention_cpu_applies(q.detach()[..., :48], k[..., :48], v[..., :48])  # D 48 is not compiled


def test_sparse_attention_kernel_choice_by_head_dim():
    """Blocks of queries with D 128 keep the tile-union forward (faster there); one query takes the kernel."""
    q, k, v, _ = _attention_inputs(1, 4, 50, 32, 8, 128, 8)
    assert not sparse_attention_cpu_applies(q, k, v)
    assert sparse_attention_cpu_applies(q[:, :1], k, v)
    q, k, v, _ = _attention_inputs(1, 4, 50, 9, 3, 64, 8)
    assert sparse_attention_cpu_applies(q, k, v)


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_prefill_with_kernels(monkeypatch, batch):
    """Blocks take the causal prefix, then full scores, then select_chunk (from 3 * top_k keys on), and
    all of them write into the prefill's one index buffer, int32 for the kernel. With two sequences its
    blocks are strided."""
    calls = []
    monkeypatch.setattr(prefill_module, "sparse_attention_cpu", lambda *a: calls.append(a[3].dtype) or sparse_attention_cpu(*a))
    q, k, v, _ = _attention_inputs(batch, 300, 300, 9, 3, 64, 1)
    q_idx, k_idx, w = _indexer_inputs(batch, 300, 300, 4, 32, seed=9)
    with torch.no_grad():
        out, counts = sparse_prefill_torch(q, k, v, q_idx, k_idx, w, 64, chunk_size=128)
    indices = select_topk_reference(q_idx, k_idx, w, 64)
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, indices), rtol=1e-5, atol=1e-5)
    assert torch.equal(counts, (indices >= 0).sum(dim=-1))
    # chunk_size 128, but blocks of at most KERNEL_BLOCK queries with the kernel.
    assert prefill_module.KERNEL_BLOCK < 128
    assert calls == [torch.int32] * math.ceil(300 / prefill_module.KERNEL_BLOCK)


def test_build_failure_falls_back_to_pytorch(monkeypatch, caplog):
    """Without a compiler the kernels are off with one warning, and the operators keep working."""
    from torch.utils import cpp_extension

    def failing_load(*args, **kwargs):
        raise RuntimeError("Error building extension 'dsa_cpu_kernels': g++ not found")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    cpu_kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="dsa.ops._cpu"):
            assert cpu_kernels() is None
        assert "could not be built" in caplog.text
        assert "g++ not found" in caplog.text
        q, k, v, indices = _attention_inputs(1, 12, 100, 9, 3, 64, 20)
        assert not sparse_attention_cpu_applies(q, k, v)
        with torch.no_grad():
            torch.testing.assert_close(
                sparse_attention_torch(q, k, v, indices), sparse_attention_reference(q, k, v, indices), rtol=1e-5, atol=1e-5
            )
    finally:
        cpu_kernels.cache_clear()


def test_environment_variable_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("DSA_CPU_KERNELS", "0")
    cpu_kernels.cache_clear()
    try:
        assert cpu_kernels() is None
    finally:
        monkeypatch.delenv("DSA_CPU_KERNELS")
        cpu_kernels.cache_clear()
    assert cpu_module.cpu_kernels() is not None


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_selection_kernels_write_into_slice(dtype):
    """With `out` (int64 or int32), select_rows and select_chunk write rows of a strided slice and nothing
    else of the buffer."""
    count, first, queries = 64, 1000, 21
    q, k, w = _indexer_inputs(2, queries, 1333, 4, 32, seed=8)
    k_t = k.transpose(1, 2)
    buffer = torch.full((2, queries + 5, count + 9), 7777, dtype=dtype)
    target = buffer[:, 3 : 3 + queries, 2 : 2 + count]
    assert select_chunk_cpu(q, k_t, w, first, count, out=target) is target
    assert torch.equal(target.long(), _chunk_expected(q, k_t, w, first, count))
    scores = torch.randn(2, queries, 900, generator=torch.Generator().manual_seed(3))
    rows_target = buffer[:, 3 : 3 + queries, 2 : 2 + count]
    assert select_rows_cpu(scores, count, out=rows_target) is rows_target
    assert torch.equal(rows_target.long(), _rule(scores, count))
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[:, 3 : 3 + queries, 2 : 2 + count] = False
    assert bool((buffer[outside] == 7777).all())


def test_selection_kernels_reject_bad_out():
    scores = torch.randn(1, 4, 300)
    with pytest.raises(ValueError, match="int64 or int32"):
        select_rows_cpu(scores, 16, out=torch.empty(1, 4, 16, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"shape \(1, 4, 16\)"):
        select_rows_cpu(scores, 16, out=torch.empty(1, 4, 17, dtype=torch.int64))
    with pytest.raises(ValueError, match="unit stride"):
        select_rows_cpu(scores, 16, out=torch.empty(1, 16, 4, dtype=torch.int64).transpose(1, 2))
    # More than 3 dims: the kernel reads rows of a contiguous view only.
    strided = torch.empty(2, 2, 4, 20, dtype=torch.int64)[..., :16]
    with pytest.raises(ValueError, match="must be contiguous"):
        select_rows_cpu(torch.randn(2, 2, 4, 300), 16, out=strided)
    q, k, w = _indexer_inputs(1, 4, 400, 4, 32)
    with pytest.raises(ValueError, match=r"shape \(1, 4, 64\)"):
        select_chunk_cpu(q, k.transpose(1, 2), w, 396, 64, out=torch.empty(1, 5, 64, dtype=torch.int64))


def test_build_name_differs_per_environment(monkeypatch):
    """Two environments (or checkouts) on one machine get separate builds, so neither rebuilds the other's."""
    first = cpu_module.build_name()
    assert first.startswith("dsa_cpu_kernels_")
    assert first == cpu_module.build_name()
    monkeypatch.setattr(cpu_module.sys, "prefix", "/elsewhere/venv")
    assert cpu_module.build_name() != first
