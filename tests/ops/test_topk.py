import pytest
import torch

import dsa.ops.topk.torch as topk_torch_module
from dsa.ops.indexer import index_scores_reference
from dsa.ops.topk import select_topk_reference, select_topk_torch

SELECTORS = [select_topk_reference, select_topk_torch]


def _inputs(batch, queries, keys, heads=3, head_dim=16, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, heads, head_dim, generator=generator).to(dtype)
    k = torch.randn(batch, keys, head_dim, generator=generator).to(dtype)
    w = torch.randn(batch, queries, heads, generator=generator).to(dtype)
    return q, k, w


def _left_padded_mask(batch, keys, pads):
    mask = torch.ones(batch, keys, dtype=torch.bool)
    for row, pad in enumerate(pads):
        mask[row, :pad] = False
    return mask


@pytest.mark.parametrize("top_k", [1, 4, 16, 200])
@pytest.mark.parametrize(("queries", "keys"), [(13, 13), (111, 111), (7, 40)])
@pytest.mark.parametrize(("sink", "local"), [(0, 0), (1, 0), (0, 1)])
def test_fast_equals_reference(top_k, queries, keys, sink, local):
    q, k, w = _inputs(2, queries, keys, seed=queries + top_k)
    mask = _left_padded_mask(2, keys, [0, 3])
    args = dict(key_padding_mask=mask, sink_tokens=sink, local_tokens=local)
    expected = select_topk_reference(q, k, w, top_k, **args)
    actual = select_topk_torch(q, k, w, top_k, chunk_size=8, **args)
    assert actual.dtype == torch.int64
    assert torch.equal(actual, expected)


def test_sinks_and_local_window_with_padding():
    q, k, w = _inputs(2, 30, 30, seed=4)
    mask = _left_padded_mask(2, 30, [0, 5])
    for select in SELECTORS:
        indices = select(q, k, w, 8, key_padding_mask=mask, sink_tokens=2, local_tokens=3)
        for row, pad in enumerate([0, 5]):
            for t in range(pad + 5, 30):
                chosen = set(indices[row, t].tolist())
                assert {pad, pad + 1} <= chosen, f"sinks missing for row {row}, query {t}"
                assert {t - 2, t - 1, t} <= chosen, f"local window missing for row {row}, query {t}"


def test_selected_scores_are_the_largest():
    q, k, w = _inputs(1, 50, 50, seed=9)
    scores = index_scores_reference(q, k, w)
    indices = select_topk_torch(q, k, w, 10)
    for t in range(10, 50):
        visible = scores[0, t, : t + 1]
        chosen = indices[0, t]
        threshold = visible[chosen].min()
        unchosen = torch.ones(t + 1, dtype=torch.bool)
        unchosen[chosen] = False
        assert (visible[unchosen] <= threshold).all()


def test_top_k_above_keys_pads_empty():
    q, k, w = _inputs(1, 6, 6)
    for select in SELECTORS:
        indices = select(q, k, w, 50)
        assert indices.shape == (1, 6, 6)  # K = min(top_k, S)
        for t in range(6):
            assert indices[0, t, : t + 1].tolist() == list(range(t + 1))
            assert (indices[0, t, t + 1 :] == -1).all()


def test_cached_prefix_gives_non_square_mask():
    q, k, w = _inputs(1, 4, 20, seed=2)
    for select in SELECTORS:
        indices = select(q, k, w, 30, q_start=16)  # queries at positions 16..19
        assert indices.shape == (1, 4, 20)
        for t in range(4):
            valid = indices[0, t][indices[0, t] >= 0]
            assert valid.tolist() == list(range(16 + t + 1))


def test_all_zero_queries_follow_tie_rule():
    q, k, w = _inputs(2, 40, 40)
    q = torch.zeros_like(q)  # every visible score is exactly 0
    mask = _left_padded_mask(2, 40, [0, 6])
    for select in SELECTORS:
        first = select(q, k, w, 5, key_padding_mask=mask, chunk_size=7)
        second = select(q, k, w, 5, key_padding_mask=mask, chunk_size=7)
        assert torch.equal(first, second)
        # lowest_index rule: the five earliest visible keys.
        assert first[0, -1].tolist() == [0, 1, 2, 3, 4]
        assert first[1, -1].tolist() == [6, 7, 8, 9, 10]


def test_ties_at_boundary_keep_lowest_index():
    # Scores by construction: key s gets score 1 for s in {2, 5, 7, 9}, 0 otherwise (ties everywhere).
    keys = 12
    k = torch.zeros(1, keys, 2)
    k[0, [2, 5, 7, 9], 0] = 1.0
    k[0, :, 1] = 0.0
    q = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    w = torch.ones(1, 1, 1)
    for select in SELECTORS:
        assert select(q, k, w, 3, q_start=keys - 1)[0, 0].tolist() == [2, 5, 7]
        assert select(q, k, w, 6, q_start=keys - 1)[0, 0].tolist() == [0, 1, 2, 5, 7, 9]


def test_later_token_never_changes_earlier_selection():
    q, k, w = _inputs(1, 60, 60, seed=11)
    before = select_topk_torch(q, k, w, 8, chunk_size=16)
    q2, k2, w2 = q.clone(), k.clone(), w.clone()
    q2[:, 40:] += 5.0
    k2[:, 40:] = torch.randn_like(k2[:, 40:]) * 10
    w2[:, 40:] *= -1
    after = select_topk_torch(q2, k2, w2, 8, chunk_size=16)
    assert torch.equal(before[:, :40], after[:, :40])
    assert not torch.equal(before[:, 40:], after[:, 40:])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_row_equals_row_alone(side):
    q, k, w = _inputs(1, 25, 25, seed=12)
    pad = 6
    alone = select_topk_torch(q, k, w, 7)

    def padded(x):
        filler = torch.randn(1, pad, *x.shape[2:])
        return torch.cat([filler, x] if side == "left" else [x, filler], dim=1)

    mask = torch.ones(1, 25 + pad, dtype=torch.bool)
    if side == "left":
        mask[:, :pad] = False
    else:
        mask[:, 25:] = False
    batched = select_topk_torch(padded(q), padded(k), padded(w), 7, key_padding_mask=mask)
    rows = batched[:, pad:] if side == "left" else batched[:, :25]
    # Shift back to the row's own positions; padding is never selected.
    shifted = torch.where(rows >= 0, rows - (pad if side == "left" else 0), rows)
    assert torch.equal(shifted, alone)
    selected = rows[rows >= 0]
    assert mask[0, selected].all(), "a padding key was selected"


def test_decode_rows_equal_prefill_rows():
    q, k, w = _inputs(2, 50, 50, seed=13)
    mask = _left_padded_mask(2, 50, [0, 4])
    prefill = select_topk_torch(q, k, w, 9, key_padding_mask=mask)
    for t in range(30, 50):
        step = select_topk_torch(
            q[:, t : t + 1], k[:, : t + 1], w[:, t : t + 1], 9, key_padding_mask=mask[:, : t + 1]
        )
        # The decode step sees S = t + 1 keys, so its width is min(9, t + 1) = 9 as in the prefill.
        assert torch.equal(step[:, 0], prefill[:, t])


def test_fully_masked_row_is_all_empty():
    q, k, w = _inputs(2, 9, 9)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1] = False
    for select in SELECTORS:
        indices = select(q, k, w, 4, key_padding_mask=mask)
        assert (indices[1] == -1).all()
        assert (indices[0, -1] >= 0).all()


def test_chunks_bound_score_matrix(monkeypatch):
    seen = []
    original = topk_torch_module.index_scores_chunk

    def recording(q_idx, k_idx_t, weights):
        seen.append(q_idx.shape[1])
        return original(q_idx, k_idx_t, weights)

    monkeypatch.setattr(topk_torch_module, "index_scores_chunk", recording)
    q, k, w = _inputs(1, 100, 100)
    select_topk_torch(q, k, w, 4, chunk_size=16)
    assert seen and max(seen) <= 16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_selects_as_fp32(dtype):
    q, k, w = _inputs(1, 40, 40, dtype=dtype, seed=21)
    expected = select_topk_reference(q.float(), k.float(), w.float(), 8)
    assert torch.equal(select_topk_torch(q, k, w, 8), expected)


def test_attention_mask_restricts_selection():
    # A block-diagonal mask (two packed documents) keeps every selection inside its own document.
    q, k, w = _inputs(1, 30, 30, seed=14)
    positions = torch.arange(30)
    document = (positions >= 12).long()
    same_document = (document.view(-1, 1) == document.view(1, -1)).unsqueeze(0)
    for select in SELECTORS:
        indices = select(q, k, w, 5, attention_mask=same_document)
        for t in range(30):
            chosen = indices[0, t][indices[0, t] >= 0]
            assert (document[chosen] == document[t]).all()
    expected = select_topk_reference(q, k, w, 5, attention_mask=same_document)
    assert torch.equal(select_topk_torch(q, k, w, 5, attention_mask=same_document, chunk_size=7), expected)


@pytest.mark.parametrize("queries", [1, 3, 8])
@pytest.mark.parametrize("masks", ["none", "padding", "rows"])
def test_few_queries_equal_reference(queries, masks):
    # Without sinks or a local window, rows take plain topk (`_topk_rows`); the sets must still equal the reference's.
    q, k, w = _inputs(2, queries, 300, seed=queries)
    kwargs = {}
    if masks == "padding":
        kwargs["key_padding_mask"] = _left_padded_mask(2, 300, [0, 37])
    if masks == "rows":
        rows = torch.rand(2, queries, 300, generator=torch.Generator().manual_seed(1)) > 0.3
        kwargs["attention_mask"] = rows
    expected = select_topk_reference(q, k, w, 64, **kwargs)
    assert torch.equal(select_topk_torch(q, k, w, 64, **kwargs), expected)


def test_boundary_ties_use_general_rule(monkeypatch):
    # Integer inputs give many equal scores, so ties straddle the top-k boundary: topk's own choice
    # among them is arbitrary and the general rule (lowest index) must decide.
    generator = torch.Generator().manual_seed(2)
    q = torch.randint(-1, 2, (1, 1, 2, 4), generator=generator).float()
    k = torch.randint(-1, 2, (1, 500, 4), generator=generator).float()
    w = torch.ones(1, 1, 2)
    _pytorch_rule_only(monkeypatch)
    calls = []
    original = topk_torch_module._choose
    monkeypatch.setattr(topk_torch_module, "_choose", lambda *args: calls.append(1) or original(*args))
    assert torch.equal(select_topk_torch(q, k, w, 50), select_topk_reference(q, k, w, 50))
    assert calls, "a boundary tie must fall back to the general rule"


@pytest.mark.parametrize("queries", [1, 300])
def test_no_ties_skip_general_rule(monkeypatch, queries):
    # Positive inputs give positive, distinct scores: no ties anywhere.
    q, k, w = (t.abs() for t in _inputs(1, queries, 400, seed=3))

    _pytorch_rule_only(monkeypatch)

    def fail(*args):
        raise AssertionError("rows without boundary ties should not build the general rule's masks")

    monkeypatch.setattr(topk_torch_module, "_choose", fail)
    assert torch.equal(select_topk_torch(q, k, w, 32), select_topk_reference(q, k, w, 32))


def _pytorch_rule_only(monkeypatch):
    """Keep fp32 CPU scores on the PyTorch selection: the tests below check its own paths, which the C++
    kernel (tested in test_cpu_kernels.py) otherwise replaces."""
    monkeypatch.setattr(topk_torch_module, "select_rows_cpu_applies", lambda scores: False)
    monkeypatch.setattr(topk_torch_module, "select_few_cpu_applies", lambda q_idx, k_idx: False)
    monkeypatch.setattr(topk_torch_module, "select_chunk_cpu", lambda *args, **kwargs: None)


def _spy_sampled(monkeypatch, name="_sampled_topk"):
    """Record whether each call of the sampled path `name` returned a selection (True) or fell back (False).
    Also keeps the selection on the PyTorch path."""
    _pytorch_rule_only(monkeypatch)
    outcomes = []
    sampled = getattr(topk_torch_module, name)

    def spy(scores, count):
        found = sampled(scores, count)
        outcomes.append(found is not None)
        return found

    monkeypatch.setattr(topk_torch_module, name, spy)
    return outcomes


@pytest.mark.parametrize("levels", [None, 7], ids=["distinct", "tied"])
def test_sampled_decode_equals_reference(monkeypatch, levels):
    # Decode rows with keys >= SAMPLED_MIN_SPAN * top_k take the sampled-threshold path. With scores
    # rounded to a few levels, many keys tie the boundary and the lowest-index rule decides.
    outcomes = _spy_sampled(monkeypatch)
    q, k, w = _inputs(2, 1, 4096, seed=21)
    if levels is not None:
        k = (k * levels).round() / levels
        q = (q * levels).round() / levels
    mask = _left_padded_mask(2, 4096, [0, 300])
    expected = select_topk_reference(q, k, w, 64, key_padding_mask=mask)
    actual = select_topk_torch(q, k, w, 64, key_padding_mask=mask)
    assert outcomes == [True]
    assert torch.equal(actual, expected)


def test_sampled_topk_falls_back(monkeypatch):
    # When only the sampled positions (every SAMPLE_STRIDE-th key) score high, fewer than top_k keys reach
    # the sample's bound. When all scores are equal, every key is a candidate. Both fall back to topk.
    outcomes = _spy_sampled(monkeypatch)
    keys, top_k = 4096, 64
    for name, scores in (
        ("sample misleads", torch.arange(keys).remainder(topk_torch_module.SAMPLE_STRIDE).eq(0).float() * 10 + torch.rand(keys)),
        ("all equal", torch.ones(keys)),
    ):
        scores = scores.view(1, 1, keys)
        outcomes.clear()
        indices = topk_torch_module._topk_rows(scores.clone(), top_k)
        assert outcomes == [False], name
        chosen = torch.zeros(keys, dtype=torch.bool)
        chosen[indices[0, 0]] = True
        expected = topk_torch_module._choose(scores, torch.ones_like(scores, dtype=torch.bool), None, top_k)[0, 0]
        assert torch.equal(chosen, expected), name


@pytest.mark.parametrize("levels", [None, 7], ids=["distinct", "tied"])
def test_sampled_prefill_equals_reference(monkeypatch, levels):
    # Prefill chunks whose keys reach SAMPLED_MIN_SPAN * top_k take the many-row sampled path. Random
    # signed inputs leave some rows with fewer than top_k positive scores, so their k-th largest is a
    # tie at 0. With scores rounded to a few levels, ties are everywhere. Tied rows follow the tie rule
    # among the sampled candidates, without the full-row rule (`_choose`).
    outcomes = _spy_sampled(monkeypatch, "_sampled_select")
    monkeypatch.setattr(topk_torch_module, "_choose", lambda *args: pytest.fail("a sampled row ran the full-row tie rule"))
    q, k, w = _inputs(1, 96, 1200, seed=22)
    if levels is not None:
        k = (k * levels).round() / levels
        q = (q * levels).round() / levels
    expected = select_topk_reference(q, k, w, 64, q_start=1200 - 96)
    actual = select_topk_torch(q, k, w, 64, q_start=1200 - 96, chunk_size=32)
    assert torch.equal(actual, expected)
    assert outcomes == [True] * 3
    # Some rows, not all, have keys outside the selection that tie its lowest score.
    scores = index_scores_reference(q, k, w)[0]
    tied_rows = 0
    for row in range(96):
        visible = scores[row, : 1200 - 96 + row + 1]
        boundary = visible[expected[0, row]].min()
        tied_rows += int((visible == boundary).sum()) > int((visible[expected[0, row]] == boundary).sum())
    assert 0 < tied_rows < 96


def test_sampled_select_falls_back():
    # Three rows the bound cannot serve. High scores only at the sampled positions admit too few
    # candidates, equal scores admit every key, and -inf in the sample (masked keys) gives no bound.
    keys, top_k, stride = 4096, 64, topk_torch_module.SAMPLE_STRIDE
    misleading = torch.arange(keys).remainder(stride).eq(0).float() * 10 + torch.rand(keys)
    masked = torch.rand(keys)
    masked[: keys - 100] = float("-inf")
    for name, row in (("sample misleads", misleading), ("all equal", torch.ones(keys)), ("masked", masked)):
        scores = torch.stack([torch.rand(keys), row]).view(1, 2, keys)
        assert topk_torch_module._sampled_select(scores, top_k) is None, name


def _assert_same_up_to_near_ties(actual, expected, scores, rtol):
    """Assert two selections [B, T, K] differ only in keys whose scores [B, T, S] lie within rtol of the
    row's k-th largest selected score (two sums of the same rounded terms in another order)."""
    swaps = 0
    for b in range(actual.shape[0]):
        for t in range(actual.shape[1]):
            mine, theirs = set(actual[b, t].tolist()) - {-1}, set(expected[b, t].tolist()) - {-1}
            assert len(mine) == len(theirs), f"row ({b}, {t}) selects {len(mine)} keys, the reference {len(theirs)}"
            if mine == theirs:
                continue
            boundary = float(scores[b, t, sorted(theirs)].min())
            for key in mine ^ theirs:
                gap = abs(float(scores[b, t, key]) - boundary)
                assert gap <= rtol * max(abs(boundary), 1e-6), f"row ({b}, {t}) key {key}: score gap {gap} at the boundary"
            swaps += 1
    return swaps


@pytest.mark.parametrize(
    ("queries", "keys", "q_start"),
    [(96, 96, None), (1, 4096, None), (1, 4000, None), (64, 1200, 1200 - 64)],
    ids=["prefill", "decode", "decode-tail", "sampled-prefill"],
)
def test_bf16_product_selects_as_bf16_reference(queries, keys, q_start):
    # Decode rows of 4096 keys and prefill rows of 1200 keys reach SAMPLED_MIN_SPAN * top_k, so the
    # sampled paths run too. The two sides round the same bf16 logits, and only their summation order differs.
    q, k, w = _inputs(2, queries, keys, heads=4, head_dim=32, seed=keys)
    scores = index_scores_reference(q, k, w, score_dtype=torch.bfloat16)
    expected = select_topk_reference(q, k, w, 64, q_start=q_start, score_dtype=torch.bfloat16)
    actual = select_topk_torch(q, k, w, 64, q_start=q_start, chunk_size=32, score_dtype=torch.bfloat16)
    _assert_same_up_to_near_ties(actual, expected, scores, rtol=2**-6)
    # Reading a bf16 key cache directly gives the same selection as converting fp32 keys.
    assert torch.equal(select_topk_torch(q, k.bfloat16(), w, 64, q_start=q_start, chunk_size=32, score_dtype=torch.bfloat16), actual)


def test_bf16_product_changes_few_keys():
    # Rounding q . k to bf16 moves only keys near each row's boundary: over 90% of the fp32 set stays.
    q, k, w = _inputs(1, 64, 2048, heads=4, head_dim=32, seed=5)
    fp32 = select_topk_torch(q, k, w, 256, q_start=2048 - 64)
    bf16 = select_topk_torch(q, k, w, 256, q_start=2048 - 64, score_dtype=torch.bfloat16)
    kept_share = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(fp32[0], bf16[0])) / fp32[0].numel()
    assert 0.9 <= kept_share < 1.0, kept_share


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("cpu_kernels", [True, False])
@pytest.mark.parametrize(("queries", "keys", "top_k"), [(40, 40, 16), (12, 900, 64), (5, 30, 64)])
def test_out_buffer_receives_the_selection(monkeypatch, cpu_kernels, queries, keys, top_k, dtype):
    """With `out` (a strided slice of a larger int64 or int32 buffer), the selection is written there and
    returned, on the C++ path and on the PyTorch one, and the rest of the buffer is left alone."""
    if not cpu_kernels:
        monkeypatch.setattr(topk_torch_module, "select_rows_cpu_applies", lambda scores: False)
        monkeypatch.setattr(topk_torch_module, "select_chunk_cpu", lambda *args, **kwargs: None)
    q, k, w = _inputs(2, queries, keys, heads=4, head_dim=32, seed=queries)
    width = min(top_k, keys)
    buffer = torch.full((2, queries + 3, width + 4), 7777, dtype=dtype)
    target = buffer[:, 1 : 1 + queries, :width]
    with torch.no_grad():
        result = select_topk_torch(q, k, w, top_k, chunk_size=8, out=target)
    assert result is target
    assert torch.equal(target.long(), select_topk_reference(q, k, w, top_k))
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[:, 1 : 1 + queries, :width] = False
    assert bool((buffer[outside] == 7777).all())


def test_out_buffer_wrong_shape_rejected():
    q, k, w = _inputs(1, 6, 50)
    with pytest.raises(ValueError, match=r"shape \(1, 6, 16\)"):
        select_topk_torch(q, k, w, 16, out=torch.empty(1, 6, 50, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64 or int32"):
        select_topk_torch(q, k, w, 16, out=torch.empty(1, 6, 16, dtype=torch.float32))
