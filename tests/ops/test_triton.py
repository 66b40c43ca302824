"""Triton kernels against the PyTorch references. Without a GPU they run in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports Triton), so shapes stay small."""

import importlib.util

import pytest
import torch
from helpers import assert_close, assert_within_lowp_error, unique_indices

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed: the Triton kernel tests need it (pip install triton)", allow_module_level=True)

import dsa  # noqa: E402
from dsa.ops._triton import require_triton  # noqa: E402
from dsa.ops.dispatch import resolve_backend  # noqa: E402
from dsa.ops.indexer import index_scores_reference  # noqa: E402
from dsa.ops.indexer.triton import index_scores_triton  # noqa: E402
from dsa.ops.sparse_attention import indices_to_mask, sparse_attention_reference  # noqa: E402
from dsa.ops.sparse_attention.triton import sparse_attention_decode_triton, sparse_attention_triton  # noqa: E402
from dsa.ops.topk import select_topk_torch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _randn(*shape, generator, dtype=torch.float32):
    return torch.randn(*shape, generator=generator).to(dtype).to(DEVICE)


def _qkv(batch, queries, keys, heads, kv_heads, head_dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = _randn(batch, queries, heads, head_dim, generator=generator, dtype=dtype)
    k = _randn(batch, keys, kv_heads, head_dim, generator=generator, dtype=dtype)
    v = _randn(batch, keys, kv_heads, head_dim, generator=generator, dtype=dtype)
    return q, k, v


def _run(fn, q, k, v, indices, grad_out, grad_lse=None):
    """Return out, lse, dq, dk, dv for a loss that reaches both outputs."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves, indices, return_lse=True)
    loss = (out.float() * grad_out.float()).sum()
    if grad_lse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0.0) * grad_lse).sum()
    loss.backward()
    return (out.detach(), lse.detach(), *[t.grad for t in leaves])


@pytest.mark.parametrize(
    ("queries", "keys", "heads", "kv_heads", "head_dim", "top_k"),
    [(13, 13, 4, 2, 64, 5), (9, 70, 9, 3, 64, 37), (5, 33, 8, 8, 128, 20), (6, 21, 4, 1, 48, 21)],
    ids=["G2-D64", "G3-D64-odd", "G1-D128", "G4-D48-padded"],
)
def test_sparse_attention_matches_reference_fp32(queries, keys, heads, kv_heads, head_dim, top_k):
    q, k, v = _qkv(2, queries, keys, heads, kv_heads, head_dim, seed=queries)
    generator = torch.Generator().manual_seed(1)
    indices = unique_indices(2, queries, keys, top_k, 0.25, generator).to(DEVICE)
    indices[0, 0] = -1  # a row with no key at all
    grad_out = _randn(2, queries, heads, head_dim, generator=generator)
    grad_lse = _randn(2, queries, heads, generator=generator)
    expected = _run(sparse_attention_reference, q, k, v, indices, grad_out, grad_lse)
    actual = _run(sparse_attention_triton, q, k, v, indices, grad_out, grad_lse)
    for label, got, want in zip(("out", "lse", "dq", "dk", "dv"), actual, expected):
        if label == "lse":
            assert torch.isinf(got[0, 0]).all(), "an empty row must have an infinite lse"
            assert (got[0, 0] > 0).all(), "an empty row's lse must be +inf, not -inf"
            got, want = got[torch.isfinite(want)], want[torch.isfinite(want)]
        assert_close(label, got, want, atol=3e-5, rtol=3e-5)
    assert (actual[0][0, 0] == 0).all(), "an empty row must return zeros"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_attention_low_precision_within_pytorch_error(dtype):
    q, k, v = _qkv(1, 11, 40, 6, 2, 64, dtype=dtype, seed=7)
    generator = torch.Generator().manual_seed(3)
    indices = unique_indices(1, 11, 40, 16, 0.1, generator).to(DEVICE)
    grad_out = _randn(1, 11, 6, 64, generator=generator, dtype=dtype)
    truth = _run(sparse_attention_reference, q.float(), k.float(), v.float(), indices, grad_out.float())
    own = _run(_lowp_masked_attention, q, k, v, indices, grad_out)
    fast = _run(sparse_attention_triton, q, k, v, indices, grad_out)
    for label, actual, expected, pytorch_lowp in zip(("out", "lse", "dq", "dk", "dv"), fast, truth, own):
        if label == "lse":
            continue
        assert actual.dtype == dtype, f"{label} came back as {actual.dtype}"
        assert_within_lowp_error(f"{label} {dtype}", actual.float(), expected, pytorch_lowp.float())


def _lowp_masked_attention(q, k, v, indices, return_lse=True):
    """Dense-mask attention computed in the inputs' dtype: PyTorch's own low-precision error."""
    groups = q.shape[2] // k.shape[2]
    keep = indices_to_mask(indices, k.shape[1]).unsqueeze(2)
    logits = torch.einsum("bthd,bshd->bths", q, k.repeat_interleave(groups, 2)) * q.shape[-1] ** -0.5
    logits = logits.masked_fill(~keep, float("-inf"))
    out = torch.einsum("bths,bshd->bthd", torch.softmax(logits, dim=-1), v.repeat_interleave(groups, 2))
    return out, torch.logsumexp(logits.float(), dim=-1)


def test_ties_and_duplicate_scores_follow_the_indices():
    # Equal keys give equal logits; both paths get the same index sets, so ties cannot diverge.
    q, k, v = _qkv(1, 8, 24, 4, 2, 64, seed=3)
    k[:, 12:] = k[:, :12]
    indices = torch.arange(24, device=DEVICE).expand(1, 8, 24).clone()
    indices[:, :, 20:] = -1
    expected = sparse_attention_reference(q, k, v, indices)
    assert_close("out", sparse_attention_triton(q, k, v, indices), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("splits", [None, 1, 3, 7])
def test_decode_reads_the_cache_layout_in_place(splits):
    # The Hugging Face cache is [B, HKV, S, D]; the kernels read its transposed view without a copy.
    generator = torch.Generator().manual_seed(5)
    k_cache = _randn(2, 3, 300, 64, generator=generator)
    v_cache = _randn(2, 3, 300, 64, generator=generator)
    q = _randn(2, 1, 9, 64, generator=generator)
    indices = unique_indices(2, 1, 300, 200, 0.3, generator).to(DEVICE)
    k, v = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    expected, expected_lse = sparse_attention_reference(q, k, v, indices, return_lse=True)
    out, lse = sparse_attention_decode_triton(q, k, v, indices, splits=splits, return_lse=True)
    assert_close("out", out, expected, atol=2e-5, rtol=2e-5)
    assert_close("lse", lse, expected_lse, atol=2e-5, rtol=2e-5)


def test_decode_with_an_empty_row():
    q, k, v = _qkv(1, 1, 50, 4, 2, 64)
    indices = torch.full((1, 1, 40), -1, device=DEVICE)
    out, lse = sparse_attention_decode_triton(q, k, v, indices, splits=4, return_lse=True)
    assert (out == 0).all()
    assert torch.isinf(lse).all()
    assert (lse > 0).all()


def test_decode_rejects_bad_splits():
    q, k, v = _qkv(1, 1, 10, 2, 1, 16)
    with pytest.raises(ValueError, match="splits=0 is invalid"):
        sparse_attention_decode_triton(q, k, v, torch.zeros(1, 1, 4, dtype=torch.long, device=DEVICE), splits=0)


def test_head_dim_above_256_is_rejected():
    q, k, v = _qkv(1, 2, 4, 2, 1, 272)
    with pytest.raises(ValueError, match="head dims up to 256, got D=272"):
        sparse_attention_triton(q, k, v, torch.zeros(1, 2, 2, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize(("heads", "head_dim"), [(4, 32), (3, 24), (2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_index_scores_match_reference(heads, head_dim, dtype):
    generator = torch.Generator().manual_seed(heads)
    q_idx = _randn(2, 19, heads, head_dim, generator=generator, dtype=dtype)
    k_idx = _randn(2, 77, head_dim, generator=generator, dtype=dtype)
    weights = _randn(2, 19, heads, generator=generator, dtype=dtype)
    expected = index_scores_reference(q_idx, k_idx, weights)
    actual = index_scores_triton(q_idx, k_idx, weights)
    assert actual.dtype == torch.float32
    # Both accumulate in fp32 from the same low-precision inputs: only summation order differs.
    assert_close(f"scores {dtype}", actual, expected, atol=1e-4, rtol=1e-4)


def test_index_scores_apply_causal_and_padding_limits():
    generator = torch.Generator().manual_seed(4)
    q_idx = _randn(2, 21, 4, 32, generator=generator)
    k_idx = _randn(2, 150, 32, generator=generator)
    weights = _randn(2, 21, 4, generator=generator)
    keep = torch.ones(2, 150, dtype=torch.bool, device=DEVICE)
    keep[1, :7] = False  # left padding in the second sequence
    q_start = 150 - 21
    actual = index_scores_triton(q_idx, k_idx, weights, q_start=q_start, key_padding_mask=keep)
    positions = torch.arange(q_start, 150, device=DEVICE)
    visible = (torch.arange(150, device=DEVICE)[None, :] <= positions[:, None])[None] & keep[:, None, :]
    expected = index_scores_reference(q_idx, k_idx, weights)
    assert torch.isneginf(actual[~visible]).all(), "keys beyond the causal limit or padded must be -inf"
    assert_close("visible scores", actual[visible], expected[visible], atol=1e-5, rtol=1e-5)


def test_triton_selection_equals_torch_selection():
    # Small integers make every score exact in fp32, so both selections see identical scores and ties.
    generator = torch.Generator().manual_seed(6)
    q_idx = torch.randint(-2, 3, (2, 70, 2, 16), generator=generator).float().to(DEVICE)
    k_idx = torch.randint(-2, 3, (2, 70, 16), generator=generator).float().to(DEVICE)
    weights = torch.randint(-2, 3, (2, 70, 2), generator=generator).float().to(DEVICE)
    backend = resolve_backend("triton", DEVICE)
    kwargs = {"sink_tokens": 2, "local_tokens": 3, "chunk_size": 32}
    expected = select_topk_torch(q_idx, k_idx, weights, 16, **kwargs)
    assert torch.equal(backend.select_topk(q_idx, k_idx, weights, 16, **kwargs), expected)


def test_backend_choice(monkeypatch, caplog):
    assert resolve_backend("triton", DEVICE).name == "triton"
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="Triton kernels run on a CUDA GPU.*TRITON_INTERPRET=1"):
            resolve_backend("triton", DEVICE)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "triton" else object())
    with pytest.raises(RuntimeError, match="needs the triton package, which is not installed"):
        require_triton(DEVICE)


def test_converted_model_matches_torch_backend():
    from integrations.tiny_models import tiny_model

    model = tiny_model("llama")
    dsa.convert(model, dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=6), indexer_trained=True)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids).logits
        expected_tokens = model.generate(input_ids, max_new_tokens=4, do_sample=False)
        dsa.update_config(model, backend="triton")
        actual = model(input_ids).logits
        actual_tokens = model.generate(input_ids, max_new_tokens=4, do_sample=False)
    assert_close("logits", actual, expected, atol=1e-4, rtol=1e-4)
    # Decode steps go through the split-K kernel; greedy tokens must not change.
    assert torch.equal(actual_tokens, expected_tokens)


def test_index_scores_with_fp32_key_cache():
    # In a bf16 model the indexer's keys leave a fp32 LayerNorm while its queries stay bf16.
    generator = torch.Generator().manual_seed(8)
    q_idx = _randn(1, 9, 4, 32, generator=generator, dtype=torch.bfloat16)
    k_idx = _randn(1, 40, 32, generator=generator)
    weights = _randn(1, 9, 4, generator=generator, dtype=torch.bfloat16)
    expected = index_scores_reference(q_idx, k_idx, weights)
    assert_close("scores", index_scores_triton(q_idx, k_idx, weights), expected, atol=1e-4, rtol=1e-4)
