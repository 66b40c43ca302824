"""Comparison helpers shared by the tests."""

from __future__ import annotations

import torch


def report(label: str, actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """Return (max abs error, max relative error) of actual against expected, and print them."""
    actual, expected = actual.double(), expected.double()
    both_inf = torch.isinf(actual) & torch.isinf(expected) & (actual == expected)
    difference = (actual - expected).abs().masked_fill(both_inf, 0.0)
    max_abs = float(difference.max()) if difference.numel() else 0.0
    scale = float(expected.abs().masked_fill(torch.isinf(expected), 0.0).max()) if expected.numel() else 0.0
    max_rel = max_abs / max(scale, 1e-12)
    print(f"{label}: max abs error {max_abs:.3e}, relative to max |expected| {max_rel:.3e}")
    return max_abs, max_rel


def assert_close(label: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise, after printing the errors."""
    assert actual.shape == expected.shape, f"{label}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    report(label, actual, expected)
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{label}: {m}")


def assert_within_lowp_error(
    label: str, actual: torch.Tensor, truth: torch.Tensor, pytorch_lowp: torch.Tensor, factor: float = 2.0, floor: float = 1e-5
) -> None:
    """Assert the error of `actual` against the fp32 `truth` is at most `factor` times the error PyTorch
    itself makes in the same low-precision dtype (`pytorch_lowp`), plus a small floor."""
    own_error, _ = report(f"{label} (PyTorch in low precision)", pytorch_lowp, truth)
    error, _ = report(label, actual, truth)
    assert torch.isfinite(actual).all(), f"{label}: non-finite values"
    assert error <= factor * own_error + floor, (
        f"{label}: max error {error:.3e} exceeds {factor} x PyTorch's own low-precision error {own_error:.3e} + {floor}"
    )


def unique_indices(batch: int, queries: int, keys: int, width: int, empty_share: float, generator: torch.Generator) -> torch.Tensor:
    """Random index sets [B, T, K]: distinct keys per row, a share of slots set to -1."""
    indices = torch.rand(batch, queries, keys, generator=generator).argsort(dim=-1)[..., :width]
    indices = indices.sort(dim=-1).values
    drop = torch.rand(batch, queries, width, generator=generator) < empty_share
    return indices.masked_fill(drop, -1)
