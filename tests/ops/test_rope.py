import math

import pytest
import torch

from dsa.ops.rope import apply_partial_rope, rope_cos_sin, rope_inverse_frequencies


def _rotate(x, position, rope_dim, layout, theta=10000.0):
    inv_freq = rope_inverse_frequencies(rope_dim, theta)
    cos, sin = rope_cos_sin(torch.tensor([[position]]), inv_freq)
    return apply_partial_rope(x.view(1, 1, -1), cos, sin, rope_dim, layout).flatten()


def test_one_hot_lands_where_rotate_half_puts_it():
    head_dim, rope_dim = 16, 8
    x = torch.zeros(head_dim)
    x[0] = 1.0
    out = _rotate(x, position=1, rope_dim=rope_dim, layout="rotate_half")
    # Dim 0 pairs with dim R/2 = 4 and turns by angle 1 * theta**0 = 1 radian.
    assert out[0].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    assert out[rope_dim // 2].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert out[1].item() == 0.0, "interleaved pairing would have moved mass into dim 1"
    assert torch.count_nonzero(out) == 2


def test_one_hot_interleaved_layout():
    x = torch.zeros(16)
    x[0] = 1.0
    out = _rotate(x, position=1, rope_dim=8, layout="interleaved")
    assert out[0].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    assert out[1].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert out[4].item() == 0.0


def test_dims_past_rope_dim_untouched():
    x = torch.randn(2, 5, 3, 48)
    inv_freq = rope_inverse_frequencies(16, 10000.0)
    cos, sin = rope_cos_sin(torch.arange(5).expand(2, 5) + 7, inv_freq)
    out = apply_partial_rope(x, cos, sin, 16)
    assert torch.equal(out[..., 16:], x[..., 16:])
    assert not torch.allclose(out[..., :16], x[..., :16])


def test_relative_position_property():
    # q at position m and k at position n give a dot product that depends only on m - n.
    torch.manual_seed(0)
    q, k = torch.randn(32), torch.randn(32)
    first = _rotate(q, 10, 32, "rotate_half") @ _rotate(k, 3, 32, "rotate_half")
    second = _rotate(q, 107, 32, "rotate_half") @ _rotate(k, 100, 32, "rotate_half")
    assert first.item() == pytest.approx(second.item(), rel=1e-4)


def test_invalid_layout_rejected():
    x = torch.zeros(1, 1, 8)
    cos, sin = rope_cos_sin(torch.zeros(1, 1), rope_inverse_frequencies(4, 10000.0))
    with pytest.raises(ValueError, match="'neox'"):
        apply_partial_rope(x, cos, sin, 4, "neox")
