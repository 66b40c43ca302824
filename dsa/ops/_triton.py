"""Checks of where the Triton kernels can run, and the errors raised where they cannot.

Triton compiles for CUDA (and ROCm) GPUs. With the environment variable TRITON_INTERPRET=1 set before
Triton is imported, every kernel instead runs in Triton's NumPy interpreter on CPU tensors: slow, but
exact enough to test the kernels against the PyTorch references, which is how CI runs them.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET is set to a true value (Triton then runs kernels on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_supports(device: torch.device) -> bool:
    """True when the kernels can run on `device`: a GPU with Triton installed, or the CPU under the interpreter."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def require_triton(device: torch.device) -> None:
    """Raise `RuntimeError` saying why backend='triton' cannot run on `device`."""
    if not triton_installed():
        raise RuntimeError(
            "backend='triton' needs the triton package, which is not installed; install it (pip install triton) "
            "or use backend='torch'."
        )
    if device.type == "cpu" and not interpreter_enabled():
        raise RuntimeError(
            "backend='triton' got CPU tensors; Triton kernels run on a CUDA GPU, or on the CPU only under its "
            "interpreter (set TRITON_INTERPRET=1 before importing dsa, for testing). Use backend='torch' on the CPU."
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"backend='triton' does not support device type {device.type!r}; use backend='torch'.")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
