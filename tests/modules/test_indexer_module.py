import pytest
import torch

from dsa import DSAConfig, LightningIndexer
from dsa.ops.indexer import index_scores_reference


def test_output_shapes_and_dtypes():
    config = DSAConfig.preset("smollm2-135m")
    indexer = LightningIndexer(576, config)
    hidden = torch.randn(2, 7, 576)
    q_idx, k_idx, weights = indexer(hidden, torch.arange(7).expand(2, 7))
    assert q_idx.shape == (2, 7, 4, 32)
    assert k_idx.shape == (2, 7, 32)
    assert weights.shape == (2, 7, 4)
    assert weights.dtype == torch.float32


def test_low_rank_query_path():
    config = DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, q_lora_rank=12)
    indexer = LightningIndexer(32, config)
    assert indexer.wq_a.out_features == 12
    assert indexer.wq_b.in_features == 12
    assert not hasattr(indexer, "wq")
    q_idx, _, _ = indexer(torch.randn(1, 3, 32), torch.arange(3).view(1, 3))
    assert q_idx.shape == (1, 3, 2, 16)


@pytest.mark.parametrize("layout", ["rotate_half", "interleaved"])
def test_scores_depend_on_relative_position_only(layout):
    torch.manual_seed(0)
    config = DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=16, rope_layout=layout)
    indexer = LightningIndexer(24, config)
    hidden = torch.randn(1, 6, 24)
    near = index_scores_reference(*indexer(hidden, torch.arange(6).view(1, 6)))
    far = index_scores_reference(*indexer(hidden, torch.arange(6).view(1, 6) + 1000))
    torch.testing.assert_close(far, near, atol=1e-4, rtol=1e-4)


def test_key_layer_norm_runs_in_fp32():
    config = DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=0)
    indexer = LightningIndexer(24, config).to(torch.bfloat16)
    hidden = torch.randn(1, 4, 24).to(torch.bfloat16) * 50
    _, k_idx, _ = indexer(hidden, torch.arange(4).view(1, 4))
    expected = torch.nn.functional.layer_norm(indexer.wk(hidden).float(), (16,), eps=1e-6).to(torch.bfloat16)
    assert torch.equal(k_idx, expected)


def test_bad_input_rejected():
    indexer = LightningIndexer(24, DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8))
    with pytest.raises(ValueError, match=r"positions has shape \(1, 3\); expected \[B, T\] = \(1, 4\)"):
        indexer(torch.randn(1, 4, 24), torch.arange(3).view(1, 3))
    with pytest.raises(ValueError, match="hidden_size=0 is invalid"):
        LightningIndexer(0, DSAConfig())
