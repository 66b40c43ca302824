"""Device functions shared by the Triton kernels (this module imports Triton; `_triton` does not)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa.ops._triton import interpreter_enabled


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation and IEEE fp32 products (no TF32).

    With UPCAST the operands are widened to fp32 first, because Triton's interpreter multiplies bf16
    tiles wrongly (it reads their bits as integers). Widening bf16 to fp32 is exact, so the result
    equals a bf16 tensor-core product with fp32 accumulation.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
    return tl.dot(a, b, input_precision="ieee", out_dtype=tl.float32)


def needs_upcast(dtype: torch.dtype) -> bool:
    """True when the kernels must widen `dtype` operands before tl.dot (bf16 under the interpreter)."""
    return dtype == torch.bfloat16 and interpreter_enabled()
