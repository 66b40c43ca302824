import pytest
import torch

from dsa.ops.dispatch import resolve_backend
from dsa.ops.indexer import index_scores_torch
from dsa.ops.indexer_loss import warmup_kl_blockwise
from dsa.ops.sparse_attention import sparse_attention_reference, sparse_attention_torch
from dsa.ops.topk import select_topk_reference, select_topk_torch

ATTENTION = [sparse_attention_reference, sparse_attention_torch]
SELECT = [select_topk_reference, select_topk_torch]


def _qkv(heads=4, kv_heads=2, queries=5, keys=5, head_dim=8):
    return torch.randn(1, queries, heads, head_dim), torch.randn(1, keys, kv_heads, head_dim), torch.randn(1, keys, kv_heads, head_dim)


@pytest.mark.parametrize("fn", ATTENTION)
def test_heads_not_multiple_of_kv_heads(fn):
    q, k, v = _qkv(heads=5, kv_heads=2)
    with pytest.raises(ValueError, match="H=5 heads, which is not a multiple of HKV=2"):
        fn(q, k, v, torch.zeros(1, 5, 2, dtype=torch.long))


@pytest.mark.parametrize("fn", ATTENTION)
def test_out_of_range_indices(fn):
    q, k, v = _qkv()
    indices = torch.zeros(1, 5, 2, dtype=torch.long)
    indices[0, 0, 0] = 5
    with pytest.raises(ValueError, match=r"values in \[0, 5\]; expected -1 \(empty slot\) or a key index in \[0, S=5\)"):
        fn(q, k, v, indices)
    indices[0, 0, 0] = -2
    with pytest.raises(ValueError, match=r"values in \[-2, 0\]"):
        fn(q, k, v, indices)


@pytest.mark.parametrize("fn", ATTENTION)
def test_mismatched_shapes(fn):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"k has shape \(1, 5, 2, 8\) but v has \(1, 4, 2, 8\)"):
        fn(q, k, v[:, :4], torch.zeros(1, 5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices has shape \(1, 4, 2\); expected \[B, T, K\] with B=1, T=5"):
        fn(q, k, v, torch.zeros(1, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"D=8\] to match q"):
        fn(q, k[..., :4], v[..., :4], torch.zeros(1, 5, 2, dtype=torch.long))


@pytest.mark.parametrize("fn", ATTENTION)
def test_unsupported_dtypes(fn):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="q has dtype torch.float64; expected one of float32, float16, bfloat16"):
        fn(q.double(), k, v, torch.zeros(1, 5, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="indices has dtype torch.float32; expected torch.int32 or torch.int64"):
        fn(q, k, v, torch.zeros(1, 5, 2))
    with pytest.raises(TypeError, match="q, k, v dtypes differ"):
        fn(q.half(), k, v, torch.zeros(1, 5, 2, dtype=torch.long))


@pytest.mark.parametrize("fn", SELECT)
def test_selection_argument_errors(fn):
    q_idx, k_idx, w = torch.randn(1, 4, 2, 8), torch.randn(1, 6, 8), torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="top_k=0 is invalid"):
        fn(q_idx, k_idx, w, 0)
    with pytest.raises(ValueError, match="q_start=3 is invalid for T=4 queries and S=6 keys"):
        fn(q_idx, k_idx, w, 2, q_start=3)
    with pytest.raises(ValueError, match=r"weights has shape \(1, 4, 3\); expected \[B, T, HI\] = \(1, 4, 2\)"):
        fn(q_idx, k_idx, torch.randn(1, 4, 3), 2)
    with pytest.raises(ValueError, match=r"k_idx has shape \(1, 6, 7\)"):
        fn(q_idx, k_idx[..., :7], w, 2)
    with pytest.raises(TypeError, match="key_padding_mask has dtype torch.int64; expected torch.bool"):
        fn(q_idx, k_idx, w, 2, key_padding_mask=torch.ones(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(1, 5\); expected \[B, S\] = \(1, 6\)"):
        fn(q_idx, k_idx, w, 2, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="sink_tokens=2, local_tokens=2 are invalid for top_k=3"):
        fn(q_idx, k_idx, w, 3, sink_tokens=2, local_tokens=2)


def test_indexer_score_rank_errors():
    with pytest.raises(ValueError, match=r"q_idx must have 4 dims, got shape \(4, 2, 8\)"):
        index_scores_torch(torch.randn(4, 2, 8), torch.randn(1, 6, 8), torch.randn(1, 4, 2))
    with pytest.raises(TypeError, match="k_idx must be a torch.Tensor, got list"):
        index_scores_torch(torch.randn(1, 4, 2, 8), [[1.0]], torch.randn(1, 4, 2))


def test_loss_shape_errors():
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match=r"q_start=9 is invalid"):
        warmup_kl_blockwise(q, k, torch.randn(1, 5, 2, 8), torch.randn(1, 5, 8), torch.randn(1, 5, 2), q_start=9)


def test_backend_names():
    assert resolve_backend("torch", torch.device("cpu")).name == "torch"
    assert resolve_backend("reference", torch.device("cpu")).name == "reference"
    assert resolve_backend("auto", torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="backend='cuda' is invalid"):
        resolve_backend("cuda", torch.device("cpu"))


def test_auto_backend_logs_choice_once(caplog):
    import dsa.ops.dispatch as dispatch

    dispatch._logged_auto_choices.clear()
    with caplog.at_level("INFO", logger="dsa.ops.dispatch"):
        resolve_backend("auto", torch.device("cpu"))
        resolve_backend("auto", torch.device("cpu"))
    messages = [r.getMessage() for r in caplog.records if "chose" in r.getMessage()]
    assert messages == ["dsa backend 'auto' chose 'torch' on device type 'cpu'."]
