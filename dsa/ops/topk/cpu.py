"""Per-row top-k with the reference's tie rule on the CPU (the C++ kernel `select_rows` of dsa/ops/_cpu.cpp).

For each row of scores it samples every 16th score, takes a bound that about 1.25 * count keys reach,
finds the count-th largest among the keys at or above the bound, and lists the selected keys in key
order: the same rule and sample as `_sampled_select` in `dsa.ops.topk.torch`, without its [Tc, S]
temporaries. Rows where the bound admits fewer than count or more than half of the keys use every
key as a candidate, so the result never depends on the sample.
"""

from __future__ import annotations

import torch

from dsa.ops._cpu import cpu_kernels


def select_rows_cpu_applies(scores: torch.Tensor) -> bool:
    """True when `select_rows_cpu` can take scores: fp32 on the CPU, and the kernels build."""
    return scores.device.type == "cpu" and scores.dtype == torch.float32 and cpu_kernels() is not None


def select_rows_cpu(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Return indices [..., count] (int64, ascending, -1 after a row's last visible key) of each row's
    `count` largest scores [..., S'] (invisible keys -inf), ties at the boundary to the lowest index.
    Callers check `select_rows_cpu_applies` first."""
    kernels = cpu_kernels()
    assert kernels is not None, "call select_rows_cpu_applies() before select_rows_cpu()"
    span = scores.shape[-1]
    return kernels.select_rows(scores.detach().reshape(-1, span), count).view(*scores.shape[:-1], count)
