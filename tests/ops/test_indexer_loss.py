import math

import pytest
import torch
from helpers import assert_close

from dsa.ops.indexer_loss import sparse_kl_blockwise, sparse_kl_reference, warmup_kl_blockwise, warmup_kl_reference
from dsa.ops.topk import select_topk_torch


def _inputs(batch, queries, keys, heads=6, kv_heads=2, head_dim=16, index_heads=3, index_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return (
        randn(batch, queries, heads, head_dim),
        randn(batch, keys, kv_heads, head_dim),
        randn(batch, queries, index_heads, index_dim),
        randn(batch, keys, index_dim),
        randn(batch, queries, index_heads),
    )


def _loss_and_grads(fn, q, k, q_idx, k_idx, w, *args, **kwargs):
    leaves = [t.clone().requires_grad_() for t in (q, k, q_idx, k_idx, w)]
    loss = fn(*leaves, *args, **kwargs)
    loss.backward()
    return loss.detach(), leaves


@pytest.mark.parametrize(("queries", "keys", "q_start"), [(13, 13, None), (111, 111, None), (9, 30, 21), (9, 30, 4)])
def test_warmup_blockwise_equals_full_matrix(queries, keys, q_start):
    inputs = _inputs(2, queries, keys, seed=queries)
    mask = torch.ones(2, keys, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, -2:] = False
    kwargs = dict(q_start=q_start, key_padding_mask=mask)
    loss_ref, leaves_ref = _loss_and_grads(warmup_kl_reference, *inputs, **kwargs)
    loss_fast, leaves_fast = _loss_and_grads(warmup_kl_blockwise, *inputs, chunk_elements=700, **kwargs)
    assert_close("warm-up KL", loss_fast, loss_ref, atol=1e-6, rtol=1e-5)
    for name, fast, reference in zip(("q_idx", "k_idx", "weights"), leaves_fast[2:], leaves_ref[2:]):
        assert_close(f"d{name}", fast.grad, reference.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("wanted", [2, 3, 4])
def test_warmup_blockwise_one_gradient_requested(wanted):
    # The blockwise loss writes its gradients by hand and skips those not requested: each alone must
    # still equal the reference's.
    inputs = _inputs(1, 40, 40, seed=wanted)
    grads = []
    for fn in (warmup_kl_reference, warmup_kl_blockwise):
        leaves = [t.clone().requires_grad_(i == wanted) for i, t in enumerate(inputs)]
        fn(*leaves, q_start=0).backward()
        grads.append(leaves[wanted].grad)
        assert all(leaf.grad is None for i, leaf in enumerate(leaves) if i != wanted)
    assert_close("requested gradient", grads[1], grads[0], atol=1e-7, rtol=1e-5)


def test_warmup_blockwise_bf16_indexer_inputs():
    q, k, q_idx, k_idx, w = _inputs(1, 30, 30)
    low = [t.to(torch.bfloat16) for t in (q_idx, k_idx, w)]
    loss_ref, leaves_ref = _loss_and_grads(warmup_kl_reference, q, k, *[t.float() for t in low])
    loss_fast, leaves_fast = _loss_and_grads(warmup_kl_blockwise, q, k, *low, chunk_elements=600)
    assert_close("bf16 warm-up KL", loss_fast, loss_ref, atol=1e-6, rtol=1e-5)
    for fast, reference in zip(leaves_fast[2:], leaves_ref[2:]):
        assert fast.grad.dtype == torch.bfloat16
        assert_close("bf16 gradient", fast.grad.float(), reference.grad.to(torch.bfloat16).float(), atol=1e-2, rtol=1e-2)


def test_warmup_gradient_reaches_only_indexer():
    inputs = _inputs(1, 10, 10)
    for fn in (warmup_kl_reference, warmup_kl_blockwise):
        _, leaves = _loss_and_grads(fn, *inputs)
        assert leaves[0].grad is None, f"{fn.__name__} sent gradient into q"
        assert leaves[1].grad is None, f"{fn.__name__} sent gradient into k"
        assert all(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in leaves[2:])


def test_warmup_value_for_one_row_by_hand():
    # Query 0 attends one key (KL 0), query 1 attends two, one attention head, one indexer head.
    q = torch.tensor([[[[1.0, 0.0]], [[2.0, 0.0]]]])  # [B=1, T=2, H=1, D=2]
    k = torch.tensor([[[[0.0, 0.0]], [[1.0, 0.0]]]])  # [B=1, S=2, HKV=1, D=2]
    q_idx = torch.tensor([[[[1.0]], [[1.0]]]])  # [B=1, T=2, HI=1, DI=1]
    k_idx = torch.tensor([[[3.0], [-1.0]]])  # ReLU turns the second score into 0
    w = torch.ones(1, 2, 1)
    scale = 2**-0.5
    p1 = torch.softmax(torch.tensor([0.0, 2.0 * scale]), dim=0)
    log_pred = torch.log_softmax(torch.tensor([3.0, 0.0]), dim=0)
    row1 = float((p1 * (p1.log() - log_pred)).sum())
    expected = (0.0 + row1) / 2  # the mean over the 2 counted queries
    for fn in (warmup_kl_reference, warmup_kl_blockwise):
        assert fn(q, k, q_idx, k_idx, w).item() == pytest.approx(expected, rel=1e-5)


def test_warmup_fully_masked_rows_not_counted():
    inputs = _inputs(2, 8, 8)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1] = False
    only_first = warmup_kl_blockwise(*(t[:1] for t in inputs), key_padding_mask=mask[:1])
    both = warmup_kl_blockwise(*inputs, key_padding_mask=mask)
    assert both.item() == pytest.approx(only_first.item(), rel=1e-6)
    assert math.isfinite(both.item())


@pytest.mark.parametrize("top_k", [1, 5, 40])
def test_sparse_kl_blockwise_equals_reference(top_k):
    inputs = _inputs(2, 37, 37, seed=top_k)
    q, k, q_idx, k_idx, w = inputs
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, :6] = False
    indices = select_topk_torch(q_idx, k_idx, w, top_k, key_padding_mask=mask)
    loss_ref, leaves_ref = _loss_and_grads(sparse_kl_reference, *inputs, indices)
    loss_fast, leaves_fast = _loss_and_grads(sparse_kl_blockwise, *inputs, indices, chunk_size=8)
    assert_close("sparse KL", loss_fast, loss_ref, atol=1e-6, rtol=1e-5)
    for name, fast, reference in zip(("q_idx", "k_idx", "weights"), leaves_fast[2:], leaves_ref[2:]):
        assert_close(f"d{name}", fast.grad, reference.grad, atol=1e-7, rtol=1e-5)
    assert leaves_fast[0].grad is None
    assert leaves_fast[1].grad is None


def test_sparse_kl_with_top_k_one_is_zero():
    # A single selected key: both distributions put all mass on it.
    q, k, q_idx, k_idx, w = _inputs(1, 12, 12)
    indices = select_topk_torch(q_idx, k_idx, w, 1)
    assert sparse_kl_blockwise(q, k, q_idx, k_idx, w, indices).item() == pytest.approx(0.0, abs=1e-6)


def test_sparse_kl_all_keys_equals_warmup():
    q, k, q_idx, k_idx, w = _inputs(1, 20, 20, seed=3)
    indices = select_topk_torch(q_idx, k_idx, w, 64)
    sparse = sparse_kl_blockwise(q, k, q_idx, k_idx, w, indices)
    dense = warmup_kl_blockwise(q, k, q_idx, k_idx, w)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5)


def test_warmup_blockwise_with_attention_mask():
    inputs = _inputs(2, 24, 24, seed=5)
    document = (torch.arange(24) >= 10).long()
    same_document = (document.view(-1, 1) == document.view(1, -1)).unsqueeze(0).expand(2, -1, -1)
    loss_ref, leaves_ref = _loss_and_grads(warmup_kl_reference, *inputs, attention_mask=same_document)
    loss_fast, leaves_fast = _loss_and_grads(warmup_kl_blockwise, *inputs, attention_mask=same_document, chunk_elements=500)
    assert_close("masked warm-up KL", loss_fast, loss_ref, atol=1e-6, rtol=1e-5)
    assert_close("masked dk_idx", leaves_fast[3].grad, leaves_ref[3].grad, atol=1e-7, rtol=1e-5)
