import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_within_lowp_error, unique_indices

import dsa.ops.sparse_attention.torch as sparse_attention_torch_module
from dsa.ops.sparse_attention import indices_to_mask, sparse_attention_reference, sparse_attention_torch
from dsa.ops.topk import select_topk_torch


def _qkv(batch, queries, keys, heads, kv_heads, head_dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, heads, head_dim, generator=generator).to(dtype)
    k = torch.randn(batch, keys, kv_heads, head_dim, generator=generator).to(dtype)
    v = torch.randn(batch, keys, kv_heads, head_dim, generator=generator).to(dtype)
    return q, k, v


def _run(fn, q, k, v, indices, grad_out, **kwargs):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, indices, **kwargs)
    out.backward(grad_out)
    return out.detach(), *[t.grad for t in leaves]


def _lowp_oracle(q, k, v, indices):
    """Dense-mask attention computed entirely in the inputs' dtype: PyTorch's own low-precision error."""
    groups = q.shape[2] // k.shape[2]
    keep = indices_to_mask(indices, k.shape[1]).unsqueeze(2)
    logits = torch.einsum("bthd,bshd->bths", q, k.repeat_interleave(groups, 2)) * q.shape[-1] ** -0.5
    probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.einsum("bths,bshd->bthd", probs, v.repeat_interleave(groups, 2))


@pytest.mark.parametrize(
    ("queries", "keys", "heads", "kv_heads", "head_dim", "top_k"),
    [(13, 13, 4, 2, 64, 5), (111, 130, 9, 3, 48, 17), (7, 50, 6, 1, 80, 50), (1, 300, 8, 8, 32, 64)],
)
def test_fast_matches_reference_fp32(queries, keys, heads, kv_heads, head_dim, top_k):
    q, k, v = _qkv(2, queries, keys, heads, kv_heads, head_dim, seed=queries)
    indices = unique_indices(2, queries, keys, min(top_k, keys), 0.2, torch.Generator().manual_seed(1))
    indices[0, 0] = -1  # one fully empty row
    grad_out = torch.randn(2, queries, heads, head_dim)
    reference = _run(sparse_attention_reference, q, k, v, indices, grad_out)
    fast = _run(sparse_attention_torch, q, k, v, indices, grad_out, chunk_size=16)
    for label, actual, expected in zip(("out", "dq", "dk", "dv"), fast, reference):
        assert_close(label, actual, expected, atol=2e-5, rtol=2e-5)


def test_lse_matches_reference():
    q, k, v = _qkv(1, 20, 30, 4, 2, 16)
    indices = unique_indices(1, 20, 30, 8, 0.3, torch.Generator().manual_seed(2))
    indices[0, 3] = -1
    _, lse_reference = sparse_attention_reference(q, k, v, indices, return_lse=True)
    _, lse_fast = sparse_attention_torch(q, k, v, indices, return_lse=True)
    assert torch.isinf(lse_fast[0, 3]).all()
    assert (lse_fast[0, 3] > 0).all()
    assert_close("lse", lse_fast, lse_reference, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_pytorch_error(dtype):
    q, k, v = _qkv(1, 40, 60, 6, 2, 64, dtype=dtype, seed=7)
    indices = unique_indices(1, 40, 60, 16, 0.1, torch.Generator().manual_seed(3))
    grad_out = torch.randn(1, 40, 6, 64).to(dtype)
    truth = _run(sparse_attention_reference, q.float(), k.float(), v.float(), indices, grad_out.float())
    own = _run(lambda a, b, c, i: _lowp_oracle(a, b, c, i), q, k, v, indices, grad_out)
    fast = _run(sparse_attention_torch, q, k, v, indices, grad_out)
    for label, actual, expected, pytorch_lowp in zip(("out", "dq", "dk", "dv"), fast, truth, own):
        assert actual.dtype == dtype
        assert_within_lowp_error(f"{label} {dtype}", actual.float(), expected, pytorch_lowp.float())


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 48), (8, 2, 80)])
def test_short_sequence_equals_sdpa(heads, kv_heads, head_dim):
    # With T <= top_k every query selects all its visible keys: sparse attention is dense causal attention.
    q, k, v = _qkv(2, 37, 37, heads, kv_heads, head_dim, seed=heads)
    generator = torch.Generator().manual_seed(0)
    q_idx, k_idx, w = torch.randn(2, 37, 2, 8, generator=generator), torch.randn(2, 37, 8, generator=generator), torch.randn(2, 37, 2, generator=generator)
    indices = select_topk_torch(q_idx, k_idx, w, 64)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    assert_close("sparse vs SDPA", sparse_attention_torch(q, k, v, indices), expected, atol=1e-5, rtol=1e-5)


def test_empty_rows_give_zero_and_finite_gradients():
    q, k, v = _qkv(1, 5, 8, 2, 1, 16)
    indices = torch.full((1, 5, 3), -1)
    indices[0, 2] = torch.tensor([0, 4, -1])
    grad_out = torch.ones(1, 5, 2, 16)
    for fn in (sparse_attention_reference, sparse_attention_torch):
        out, dq, dk, dv = _run(fn, q, k, v, indices, grad_out)
        assert (out[0, [0, 1, 3, 4]] == 0).all()
        for label, tensor in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
            assert torch.isfinite(tensor).all(), f"{fn.__name__} {label} has NaN or inf"
        assert (dq[0, [0, 1, 3, 4]] == 0).all()
        assert (dk[0, [1, 2, 3, 5, 6, 7]] == 0).all()


def test_later_token_never_changes_earlier_output():
    q, k, v = _qkv(1, 40, 40, 4, 2, 16, seed=5)
    q_idx, k_idx, w = torch.randn(1, 40, 2, 8), torch.randn(1, 40, 8), torch.randn(1, 40, 2)
    before = sparse_attention_torch(q, k, v, select_topk_torch(q_idx, k_idx, w, 6))
    q[:, 25:] += 3
    k[:, 25:] *= -2
    v[:, 25:] += 1
    k_idx[:, 25:] = torch.randn(1, 15, 8) * 9
    after = sparse_attention_torch(q, k, v, select_topk_torch(q_idx, k_idx, w, 6))
    # The no-grad forward merges a tile's index sets, so later queries change only the rounding of
    # earlier outputs (the union's width changes the order of the sums), never their value.
    assert_close("earlier outputs", after[:, :25], before[:, :25], atol=1e-6, rtol=1e-6)


def test_decode_rows_equal_prefill_rows():
    q, k, v = _qkv(2, 64, 64, 6, 3, 32, seed=8)
    q_idx, k_idx, w = torch.randn(2, 64, 2, 8), torch.randn(2, 64, 8), torch.randn(2, 64, 2)
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1, :5] = False
    prefill = sparse_attention_torch(q, k, v, select_topk_torch(q_idx, k_idx, w, 10, key_padding_mask=mask))
    for t in range(40, 64):
        indices = select_topk_torch(q_idx[:, t : t + 1], k_idx[:, : t + 1], w[:, t : t + 1], 10, key_padding_mask=mask[:, : t + 1])
        step = sparse_attention_torch(q[:, t : t + 1], k[:, : t + 1], v[:, : t + 1], indices)
        assert_close(f"decode step {t}", step[:, 0], prefill[:, t], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_grad_decode_matches_reference(dtype):
    # A decode step whose slots are all valid runs one SDPA call over the gathered rows; with a -1 slot
    # it keeps the masked path. Both read the heads-first cache layout in place.
    q, k_cache, v_cache = _qkv(2, 1, 300, 8, 2, 32, dtype=dtype, seed=11)
    k, v = k_cache.transpose(1, 2).contiguous().transpose(1, 2), v_cache.transpose(1, 2).contiguous().transpose(1, 2)
    indices = unique_indices(2, 1, 300, 64, 0.0, torch.Generator().manual_seed(12))
    for label, rows in (("all valid", indices), ("one empty slot", torch.cat([indices[..., :-1], torch.full_like(indices[..., :1], -1)], -1))):
        assert (rows >= 0).all() == (label == "all valid")
        expected = sparse_attention_reference(q.float(), k.float(), v.float(), rows)
        with torch.no_grad():
            out = sparse_attention_torch(q, k, v, rows)
        assert out.dtype == dtype
        assert_close(f"decode {label}", out.float(), expected, atol=2e-6 if dtype == torch.float32 else 2e-2, rtol=2e-2)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_row_equals_row_alone(side):
    q, k, v = _qkv(1, 30, 30, 4, 2, 16, seed=9)
    q_idx, k_idx, w = torch.randn(1, 30, 2, 8), torch.randn(1, 30, 8), torch.randn(1, 30, 2)
    alone = sparse_attention_torch(q, k, v, select_topk_torch(q_idx, k_idx, w, 7))
    pad = 5

    def padded(x):
        filler = torch.randn(1, pad, *x.shape[2:]) * 100
        return torch.cat([filler, x] if side == "left" else [x, filler], dim=1)

    mask = torch.ones(1, 30 + pad, dtype=torch.bool)
    if side == "left":
        mask[:, :pad] = False
    else:
        mask[:, 30:] = False
    indices = select_topk_torch(padded(q_idx), padded(k_idx), padded(w), 7, key_padding_mask=mask)
    out = sparse_attention_torch(padded(q), padded(k), padded(v), indices)
    rows = out[:, pad:] if side == "left" else out[:, :30]
    assert_close(f"{side}-padded row", rows, alone, atol=1e-6)


def test_chunk_size_does_not_change_result():
    q, k, v = _qkv(1, 50, 50, 4, 2, 16)
    indices = unique_indices(1, 50, 50, 12, 0.2, torch.Generator().manual_seed(4))
    whole = sparse_attention_torch(q, k, v, indices, chunk_size=1000)
    for chunk in (1, 7, 16):
        assert_close(f"chunk {chunk}", sparse_attention_torch(q, k, v, indices, chunk_size=chunk), whole, atol=1e-6)


def test_heads_first_cache_layout_read_in_place():
    # Hugging Face caches keep keys as [B, HKV, S, D]; the operator takes the transposed view as is.
    q, k, v = _qkv(2, 9, 40, 6, 3, 16, seed=10)
    indices = unique_indices(2, 9, 40, 12, 0.2, torch.Generator().manual_seed(5))
    k_view = k.transpose(1, 2).contiguous().transpose(1, 2)
    v_view = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not k_view.is_contiguous()
    grad_out = torch.randn(2, 9, 6, 16)
    expected = _run(sparse_attention_torch, q, k, v, indices, grad_out)
    actual = _run(sparse_attention_torch, q, k_view, v_view, indices, grad_out)
    for label, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert_close(f"heads-first {label}", a, e, atol=1e-6)


@pytest.mark.parametrize("queries", [1, 9], ids=["decode", "prefill"])
def test_static_cache_buffer_read_in_place(queries):
    # A static cache hands attention the first S positions of a [B, HKV, S_max, D] buffer. Its unfilled
    # tail is NaN here, so reading it would poison the output.
    batch, keys, kv_heads, head_dim, capacity = 2, 40, 3, 16, 64
    q, k, v = _qkv(batch, queries, keys, 6, kv_heads, head_dim, seed=13)
    views = []
    for x in (k, v):
        buffer = torch.full((batch, kv_heads, capacity, head_dim), float("nan"))
        buffer[:, :, :keys] = x.transpose(1, 2)
        views.append(buffer[:, :, :keys].transpose(1, 2))
    rows, strides = sparse_attention_torch_module._row_view(views[0])
    assert rows.data_ptr() == views[0].data_ptr(), "the static buffer was copied"
    assert strides == (kv_heads * capacity, 1, capacity)
    indices = unique_indices(batch, queries, keys, 12, 0.0, torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = sparse_attention_torch(q, k, v, indices)
        actual = sparse_attention_torch(q, *views, indices)
    assert_close("static buffer, no grad", actual, expected, atol=1e-6)
    grad_out = torch.randn(batch, queries, 6, head_dim)
    expected_grads = _run(sparse_attention_torch, q, k, v, indices, grad_out)
    actual_grads = _run(sparse_attention_torch, q, *views, indices, grad_out)
    for label, a, e in zip(("out", "dq", "dk", "dv"), actual_grads, expected_grads):
        assert_close(f"static buffer {label}", a, e, atol=1e-6)


@pytest.mark.parametrize("prefix_share", [0.0, 2.0], ids=["prefix", "gather"])
@pytest.mark.parametrize("width_factor", [0, 8, 10_000], ids=["per-query", "default", "union"])
@pytest.mark.parametrize(("queries", "keys", "top_k"), [(150, 150, 12), (70, 400, 40)])
def test_no_grad_forward_matches_reference(monkeypatch, width_factor, prefix_share, queries, keys, top_k):
    # Without autograd, tiles of queries gather the union of their sets once; a tile whose union is
    # too wide falls back to per-query gathers. Every mix must give the reference's out and lse.
    monkeypatch.setattr(sparse_attention_torch_module, "UNION_WIDTH_FACTOR", width_factor)
    monkeypatch.setattr(sparse_attention_torch_module, "PREFIX_SHARE", prefix_share)
    q, k_cache, v_cache = _qkv(2, queries, keys, 6, 2, 32, seed=top_k)
    k, v = k_cache.transpose(1, 2).contiguous().transpose(1, 2), v_cache.transpose(1, 2).contiguous().transpose(1, 2)
    indices = unique_indices(2, queries, keys, top_k, 0.2, torch.Generator().manual_seed(4))
    indices[1, 5] = -1
    expected, expected_lse = sparse_attention_reference(q, k, v, indices, return_lse=True)
    with torch.no_grad():
        out, lse = sparse_attention_torch(q, k, v, indices, return_lse=True)
    assert_close("out", out, expected, atol=2e-6, rtol=2e-6)
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))
    finite = torch.isfinite(expected_lse)
    assert_close("lse", lse[finite], expected_lse[finite], atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("prefix_share", [0.0, 0.75, 2.0], ids=["always-prefix", "default", "always-gather"])
@pytest.mark.parametrize("width_factor", [8, 10_000], ids=["default", "union"])
def test_no_grad_fused_tiles_match_reference(monkeypatch, width_factor, prefix_share, dtype):
    # Without lse, each tile runs SDPA over its union: a view of the key prefix when the union covers
    # enough of it, else a gather, and zero for a row without keys. int32 index rows (the fused
    # prefill's buffer) give the same result; with width factor 8 some tiles take the per-query path.
    monkeypatch.setattr(sparse_attention_torch_module, "UNION_WIDTH_FACTOR", width_factor)
    monkeypatch.setattr(sparse_attention_torch_module, "PREFIX_SHARE", prefix_share)
    q, k, v = _qkv(2, 200, 200, 6, 2, 32, seed=7)
    generator = torch.Generator().manual_seed(8)
    indices = select_topk_torch(torch.randn(2, 200, 2, 8, generator=generator), torch.randn(2, 200, 8, generator=generator),
                                torch.randn(2, 200, 2, generator=generator), 24)
    indices[1, 130] = -1
    expected = sparse_attention_reference(q, k, v, indices)
    with torch.no_grad():
        out = sparse_attention_torch(q, k, v, indices.to(dtype))
    assert_close("out", out, expected, atol=2e-6, rtol=2e-6)
    assert torch.equal(out[1, 130], torch.zeros_like(out[1, 130]))
