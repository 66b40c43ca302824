import pytest
import torch
from helpers import assert_close, assert_within_lowp_error

from dsa.ops.indexer import index_scores_reference, index_scores_torch


def _inputs(batch, queries, keys, heads, head_dim, dtype=torch.float32, seed=0, magnitude=1.0):
    generator = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, queries, heads, head_dim, generator=generator) * magnitude).to(dtype)
    k = (torch.randn(batch, keys, head_dim, generator=generator) * magnitude).to(dtype)
    w = torch.randn(batch, queries, heads, generator=generator).to(dtype)
    return q, k, w


@pytest.mark.parametrize(("queries", "keys", "head_dim"), [(13, 13, 64), (111, 130, 48), (5, 77, 80)])
def test_fast_matches_reference_fp32(queries, keys, head_dim):
    q, k, w = _inputs(2, queries, keys, 3, head_dim)
    expected = index_scores_reference(q, k, w)
    actual = index_scores_torch(q, k, w, chunk_size=16)
    assert actual.dtype == torch.float32
    assert_close("index scores fp32", actual, expected, atol=1e-5, rtol=1e-5)


def test_gradients_match_reference():
    q, k, w = _inputs(2, 19, 23, 4, 16)
    grads = []
    for fn in (index_scores_reference, index_scores_torch):
        leaves = [t.clone().requires_grad_() for t in (q, k, w)]
        out = fn(*leaves)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        grads.append([t.grad for t in leaves])
    for name, reference, fast in zip(("q_idx", "k_idx", "weights"), *grads):
        assert_close(f"d{name}", fast, reference, atol=1e-5, rtol=1e-5)


def test_relu_before_head_sum():
    # Head 0 has a negative logit, head 1 a positive one: the ReLU zeroes head 0 before the weighted sum.
    q = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # [B=1, T=1, HI=2, DI=2]
    k = torch.tensor([[[-3.0, 2.0]]])  # [B=1, S=1, DI=2]
    w = torch.tensor([[[5.0, -1.0]]])
    expected = -1.0 * 2.0 * (2**-0.5) * (2**-0.5)
    for fn in (index_scores_reference, index_scores_torch):
        assert fn(q, k, w).item() == pytest.approx(expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_pytorch_error(dtype):
    q, k, w = _inputs(1, 33, 40, 4, 64, dtype=dtype, seed=3)
    truth = index_scores_reference(q.float(), k.float(), w.float())
    heads, head_dim = q.shape[2], q.shape[3]
    # PyTorch computing the same formula in the input dtype.
    own = torch.einsum("bth,bths->bts", w * (heads**-0.5 * head_dim**-0.5), torch.einsum("bthd,bsd->bths", q, k).relu())
    assert_within_lowp_error(f"index scores {dtype}", index_scores_torch(q, k, w), truth, own.float())


def test_fp16_large_activations_stay_finite():
    # DI = 128 with entries around 30: a single dot product reaches about 128 * 900, past fp16's 65504.
    q, k, w = _inputs(1, 9, 12, 2, 128, seed=5)
    q16 = (q.abs() * 30).half()
    k16 = (k.abs() * 30).half()
    w16 = w.half()
    assert torch.isinf(torch.einsum("bthd,bsd->bths", q16, k16)).any(), "fp16 matmul should overflow here"
    truth = index_scores_reference(q16.float(), k16.float(), w16.float())
    for fn in (index_scores_reference, index_scores_torch):
        actual = fn(q16, k16, w16)
        assert torch.isfinite(actual).all()
        assert_close(f"{fn.__name__} fp16 large", actual, truth, atol=0.0, rtol=1e-5)


@pytest.mark.parametrize(("queries", "keys"), [(40, 300), (1, 2000)], ids=["prefill", "decode"])
def test_bf16_product_matches_bf16_reference(queries, keys):
    # The bf16 product rounds q, k and each logit to bf16. The reference rounds the same way, so the two
    # differ only where fp32 sums in another order round a logit to the neighbouring bf16 value.
    q, k, w = _inputs(2, queries, keys, 4, 32, seed=keys)
    expected = index_scores_reference(q, k, w, score_dtype=torch.bfloat16)
    actual = index_scores_torch(q, k, w, chunk_size=16, score_dtype=torch.bfloat16)
    assert actual.dtype == torch.float32
    # One bf16 step of a logit is at most 2**-7 of it; the weighted sum keeps that relative bound.
    bound = index_scores_reference(q.abs(), k.abs(), w.abs()) * 2**-7
    assert bool(((actual - expected).abs() <= bound + 1e-6).all())
    fp32 = index_scores_reference(q, k, w)
    assert not torch.equal(actual, fp32), "the bf16 product returned fp32 scores"
    assert_close("bf16 scores against fp32", actual, fp32, atol=0.05, rtol=0.05)


def test_score_dtype_is_checked():
    q, k, w = _inputs(1, 4, 4, 2, 8)
    for fn in (index_scores_reference, index_scores_torch):
        with pytest.raises(ValueError, match="score_dtype=torch.float16 is invalid"):
            fn(q, k, w, score_dtype=torch.float16)


def test_bf16_decode_product_keeps_its_shape(monkeypatch):
    # oneDNN builds a new bf16 kernel for each new shape, so successive decode steps (one more key each)
    # must reuse one bf16 product shape. The keys past the last multiple of SHAPE_STEP go through fp32.
    import dsa.ops.indexer.torch as indexer_torch

    bf16_shapes = []
    original_mm = torch.mm

    def recording_mm(a, b, **kwargs):
        if a.dtype == torch.bfloat16:
            bf16_shapes.append(tuple(a.shape))
        return original_mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", recording_mm)
    step = indexer_torch.SHAPE_STEP
    for keys in range(3 * step + 1, 3 * step + 6):
        q, k, w = _inputs(1, 1, keys, 4, 32, seed=keys)
        actual = index_scores_torch(q, k, w, score_dtype=torch.bfloat16)
        expected = index_scores_reference(q, k, w, score_dtype=torch.bfloat16)
        bound = index_scores_reference(q.abs(), k.abs(), w.abs()) * 2**-7
        assert bool(((actual - expected).abs() <= bound + 1e-6).all())
    assert set(bf16_shapes) == {(3 * step, 32)}
