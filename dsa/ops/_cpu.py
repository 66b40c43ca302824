"""Loader of the DSA CPU kernels (_cpu.cpp), a C++ extension compiled on first use.

PyTorch compiles the kernels with the machine's C++ compiler the first time one is needed (about
half a minute), with `-march=native`, and keeps the build in its extensions directory
(`TORCH_EXTENSIONS_DIR`, by default ~/.cache/torch_extensions). The build's name includes a digest of
the CPU's instruction-set flags, so a directory shared by different machines never hands one a binary
built for the other. It also includes a digest of the source's path and the Python environment.
PyTorch rebuilds an extension whose build inputs (source, include paths) changed. Two checkouts or
virtual environments on one machine would otherwise share one build, and each would rebuild it
whenever the other had run last.

Where the kernels cannot be built (no compiler or no ninja), `cpu_kernels()` logs a warning once and
returns None, and every caller keeps its PyTorch path. Setting the environment variable
DSA_CPU_KERNELS=0 turns the kernels off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_cpu.cpp")


def cpu_kernels_enabled() -> bool:
    """False when the environment variable DSA_CPU_KERNELS is set to 0 (or false, no, off)."""
    return os.environ.get("DSA_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_flags_digest() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "generic"
    flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def build_name() -> str:
    """Return the extension's name: digests of the CPU flags and of this checkout and environment."""
    import torch

    place = f"{SOURCE.resolve()}|{sys.prefix}|{torch.__version__}"
    return f"dsa_cpu_kernels_{_cpu_flags_digest()}_{hashlib.sha256(place.encode()).hexdigest()[:8]}"


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """Return the compiled kernel module, building it on first call, or None where it cannot run."""
    if not cpu_kernels_enabled():
        return None
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        # The ninja wheel installs its binary next to the interpreter, which is not on PATH when a
        # virtual environment's python runs without activation.
        bin_dir = str(Path(sys.executable).parent)
        if (Path(bin_dir) / "ninja").exists():
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    name = build_name()
    if not _build_exists(name):
        logger.info("Compiling the DSA CPU kernels, once per checkout and Python environment (about half a minute).")
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 - any build failure means: keep the PyTorch path
        logger.warning(
            "The DSA CPU kernels could not be built (%s: %s); using the PyTorch path, which is slower at long "
            "context. Install a C++ compiler and ninja to enable them, or set DSA_CPU_KERNELS=0 to skip this.",
            type(error).__name__, _error_summary(error),
        )
        return None


def _build_exists(name: str) -> bool:
    """True when PyTorch's extensions directory already contains a build of `name`, which may still be
    rebuilt if the source changed. False where that cannot be determined, so the caller announces a build."""
    from torch.utils import cpp_extension

    try:
        directory = Path(cpp_extension._get_build_directory(name, verbose=False))  # a private PyTorch function
    except Exception:  # noqa: BLE001 - it only decides whether a message is logged
        return False
    return (directory / f"{name}.so").exists()


def _error_summary(error: Exception, lines: int = 3) -> str:
    """Return the last few non-empty lines of a build error: the compiler's or the shell's reason comes
    after the command line that PyTorch puts first."""
    text = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " | ".join(text[-lines:]) if text else repr(error)
